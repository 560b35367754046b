// lightron/parity.hpp — the proof that a parallel layout is right, for lightron's GPT and for
// your own model: train the same steps from the same weights on one rank and on a layout,
// record every step's loss and gradient norm and the final (unsharded) parameters, and
// compare them. The report names the first step and quantity that differ.
//
// Why a tolerance and not equality: a layout adds the same numbers in another order (a
// matrix product split over tp, an all-reduce over dp), and floating-point addition is not
// associative, so losses agree to ~1e-7 relative on a stable run rather than bit for bit.
// Leaves out: the training step itself (Trainer, ModelTrainer or your own loop).
// Introduced with examples/06_your_own_model.cpp (tutorial chapter 6).
#pragma once

#include "data.hpp"  // Batch, DataSampler: the steps of a run
#include "process_groups.hpp"

#include <map>
#include <string>
#include <vector>

namespace lightron {

// One training run, as the comparison sees it. Every rank of a layout holds the same
// numbers (losses averaged over dp, norms summed over the grid, parameters gathered).
struct ParityRun {
  std::vector<double> losses, grad_norms;
  std::map<std::string, torch::Tensor> params;  // full tensors, by name, after the last step
};

// Relative on every loss and gradient norm; on parameters, per tensor,
// max|a - b| <= relative · max|reference| + parameter_absolute. (The absolute part covers
// parameters whose true gradient is zero, such as the key bias — softmax ignores a constant
// added to every score — whose gradient is rounding noise that differs between layouts.)
struct ParityTolerance {
  double relative = 1e-5;
  double parameter_absolute = 1e-6;
};

struct ParityReport {
  bool equal = true;
  std::string first_difference;  // "step 3: loss 4.1512 vs reference 4.1498 (rel 3.4e-4)"
  double worst_loss = 0, worst_grad_norm = 0, worst_parameter = 0;  // largest relative differences
  std::string summary() const {
    return equal ? fmt::format("equal within tolerance (worst relative difference: loss {:.2e}, grad norm {:.2e}, "
                               "parameters {:.2e})", worst_loss, worst_grad_norm, worst_parameter)
                 : "differs: " + first_difference;
  }
};

inline double relative_difference(double a, double reference) {
  return std::abs(a - reference) / std::max(std::abs(reference), 1e-30);
}

// Step by step, loss before gradient norm, then the parameters by name.
inline ParityReport compare_runs(const ParityRun& reference, const ParityRun& run, const ParityTolerance& tol = {}) {
  ParityReport r;
  auto differ = [&](std::string what) {
    if (r.equal) r.first_difference = std::move(what);
    r.equal = false;
  };
  if (run.losses.size() != reference.losses.size() || run.grad_norms.size() != reference.grad_norms.size())
    differ(fmt::format("{} steps vs {} in the reference", run.losses.size(), reference.losses.size()));
  auto check = [&](size_t step, const char* what, double value, double ref, double& worst) {
    const double rel = relative_difference(value, ref);
    worst = std::max(worst, rel);
    if (!(rel <= tol.relative))  // a NaN differs too
      differ(fmt::format("step {}: {} {:.9g} vs reference {:.9g} (relative {:.2e}, tolerance {:.0e})", step + 1, what,
                         value, ref, rel, tol.relative));
  };
  for (size_t i = 0; i < std::min(run.losses.size(), reference.losses.size()); ++i) {
    check(i, "loss", run.losses[i], reference.losses[i], r.worst_loss);
    check(i, "grad norm", run.grad_norms.at(i), reference.grad_norms.at(i), r.worst_grad_norm);
  }
  for (const auto& [name, p] : reference.params) {
    auto it = run.params.find(name);
    if (it == run.params.end()) {
      differ(fmt::format("parameter {} is missing", name));
      continue;
    }
    if (it->second.sizes() != p.sizes()) {
      differ(fmt::format("parameter {} has shape {} vs {}", name, c10::str(it->second.sizes()), c10::str(p.sizes())));
      continue;
    }
    const double diff = (it->second.to(torch::kDouble) - p.to(torch::kDouble)).abs().max().item<double>();
    const double scale = p.abs().max().item<double>();
    r.worst_parameter = std::max(r.worst_parameter, diff / std::max(scale, 1e-30));
    if (!(diff <= tol.relative * scale + tol.parameter_absolute))
      differ(fmt::format("after the last step: parameter {}: max |difference| {:.3g} (largest |value| {:.3g})", name, diff,
                         scale));
  }
  for (const auto& [name, p] : run.params)
    if (!reference.params.count(name)) differ(fmt::format("parameter {} is not in the reference", name));
  return r;
}

// Trains `trainer` (anything with step(micro_batches, iteration) and grad_norm: Trainer,
// ModelTrainer) for train_iters steps on this rank's share of each global batch, and records
// what compare_runs compares: every loss and gradient norm, then the full parameters.
template <typename StepTrainer>
inline ParityRun record_run(StepTrainer& trainer, const GPTSampleSource& data, DataSampler& sampler,
                            int64_t train_iters) {
  ParityRun run;
  for (int64_t it = 1; it <= train_iters; ++it) {
    std::vector<Batch> batches;
    for (const auto& indices : sampler.next_global_batch()) batches.push_back(make_batch(data, indices));
    run.losses.push_back(trainer.step(batches, it));
    run.grad_norms.push_back(trainer.grad_norm);
  }
  run.params = full_parameters(trainer);
  return run;
}

// A world of one rank, in this process (no rendezvous): the reference run's groups.
inline std::unique_ptr<ProcessGroups> single_rank_groups() {
  return make_process_groups(c10::make_intrusive<c10d::HashStore>(), /*rank=*/0, Layout());
}

// FNV-1a over the parameters' bytes: equal replicas hash equally.
inline int64_t parameter_hash(const std::vector<torch::Tensor>& params) {
  uint64_t h = 1469598103934665603ull;
  for (const auto& p : params) {
    auto cpu = p.detach().to(torch::kCPU).contiguous();
    auto bytes = static_cast<const uint8_t*>(cpu.data_ptr());
    for (int64_t i = 0; i < nbytes(cpu); ++i) h = (h ^ bytes[i]) * 1099511628211ull;
  }
  return static_cast<int64_t>(h >> 1);
}

// All dp replicas must hold identical parameters; throws naming the ranks that differ
// from dp rank 0.
inline void check_replicas(const std::vector<torch::Tensor>& params, const Group& dp, int64_t iteration) {
  auto mine = torch::tensor({parameter_hash(params)}, torch::kLong);
  auto all = all_gather(dp, mine, 0);
  std::vector<int> diverged;
  for (int r = 1; r < dp.size; ++r)
    if (all[r].item<int64_t>() != all[0].item<int64_t>()) diverged.push_back(dp.ranks[r]);
  if (!diverged.empty())
    throw RuntimeFailure(fmt::format("iteration {}: data-parallel replicas diverged: rank(s) {} differ from rank {}",
                                     iteration, fmt::join(diverged, ","), dp.ranks[0]));
}

}  // namespace lightron
