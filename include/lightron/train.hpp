// lightron/train.hpp — what a training step needs besides the model: the optimizer (AdamW),
// the learning-rate schedule (warmup, then cosine/linear/constant decay to --min-lr),
// global-norm gradient clipping, FLOP counting for MFU, and the metrics (a Megatron-style
// log line, the same numbers as JSON lines, and as TensorBoard scalars).
//
// The step itself is a few lines in each example, because that is where the parallel
// layouts differ: who runs forward/backward (pipeline_parallel.hpp), who reduces gradients
// (data_parallel.hpp), which gradients count towards the norm (tensor_parallel.hpp).
// Leaves out: loss scaling (fp16), other optimizers. Introduced in chapter 0.
#pragma once

#include "compat.hpp"
#include "core.hpp"
#include "kernels.hpp"  // adamw_one_pass
#include "tensorboard.hpp"

#include <sys/resource.h>  // getrusage: peak memory on CPU

#include <cerrno>
#include <cmath>
#include <cstring>  // strerror
#include <cstdio>
#include <fstream>
#include <limits>  // numeric_limits
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace lightron {

struct TrainConfig {
  int64_t micro_batch_size = 8;
  int64_t global_batch_size = 8;
  int64_t train_iters = 100;
  double lr = 1e-3, min_lr = 1e-4;
  std::string lr_decay_style = "cosine";  // cosine | linear | constant
  int64_t lr_warmup_iters = 0;
  int64_t lr_decay_iters = 0;  // 0 means train_iters
  double weight_decay = 0.1, adam_beta1 = 0.9, adam_beta2 = 0.95, adam_eps = 1e-8;
  double clip_grad = 1.0;  // 0 disables clipping
  int64_t eval_interval = 0, eval_iters = 10, log_interval = 10;
  uint64_t seed = 1234;
  bool check_for_nan_in_loss_and_grad = true;  // stop at a NaN/inf (guards.hpp)
  double skip_spike_factor = 0;                // > 1: skip updates above factor x the running median
  int64_t skip_spike_window = 20;              // ... of this many accepted iterations

  int64_t accumulation_steps(int64_t dp_size) const { return global_batch_size / (micro_batch_size * dp_size); }
};

inline void validate_train_config(const TrainConfig& t, int64_t dp_size) {
  const std::pair<const char*, double> reals[] = {
      {"lr", t.lr}, {"min-lr", t.min_lr}, {"weight-decay", t.weight_decay}, {"adam-beta1", t.adam_beta1},
      {"adam-beta2", t.adam_beta2}, {"adam-eps", t.adam_eps}, {"clip-grad", t.clip_grad}};
  for (const auto& [flag, value] : reals) require(std::isfinite(value), "--{} must be a finite number, got {}", flag, value);
  require(t.micro_batch_size > 0, "--micro-batch-size must be positive, got {}", t.micro_batch_size);
  require(t.global_batch_size > 0, "--global-batch-size must be positive, got {}", t.global_batch_size);
  require(t.train_iters > 0, "--train-iters must be positive, got {}", t.train_iters);
  require(t.micro_batch_size <= t.global_batch_size, "--micro-batch-size ({}) must not exceed --global-batch-size ({})",
          t.micro_batch_size, t.global_batch_size);
  require(t.train_iters <= std::numeric_limits<int64_t>::max() / t.global_batch_size,
          "--train-iters ({}) x --global-batch-size ({}) must fit in the 64-bit count of consumed samples (at most {})",
          t.train_iters, t.global_batch_size, std::numeric_limits<int64_t>::max());
  require(t.global_batch_size % (t.micro_batch_size * dp_size) == 0,
          "--global-batch-size ({}) must be divisible by --micro-batch-size ({}) x data-parallel size ({})",
          t.global_batch_size, t.micro_batch_size, dp_size);
  require(t.lr > 0, "--lr must be positive, got {}", t.lr);
  require(t.lr <= 1, "--lr must be at most 1 (AdamW moves each weight by about lr per step), got {}", t.lr);
  require(t.min_lr >= 0 && t.min_lr <= t.lr, "--min-lr ({}) must be between 0 and --lr ({})", t.min_lr, t.lr);
  require(t.lr_decay_style == "cosine" || t.lr_decay_style == "linear" || t.lr_decay_style == "constant",
          "--lr-decay-style must be cosine, linear or constant, got '{}'", t.lr_decay_style);
  require(t.lr_warmup_iters >= 0, "--lr-warmup-iters must not be negative, got {}", t.lr_warmup_iters);
  require(t.lr_decay_iters >= 0, "--lr-decay-iters must not be negative, got {}", t.lr_decay_iters);
  require(t.weight_decay >= 0, "--weight-decay must not be negative, got {}", t.weight_decay);
  require(t.lr * t.weight_decay <= 1, "--lr ({}) x --weight-decay ({}) must be at most 1 (each step multiplies a weight "
          "by 1 - lr x weight-decay)", t.lr, t.weight_decay);
  require(t.adam_beta1 >= 0 && t.adam_beta1 < 1, "--adam-beta1 must be in [0, 1), got {}", t.adam_beta1);
  require(t.adam_beta2 >= 0 && t.adam_beta2 < 1, "--adam-beta2 must be in [0, 1), got {}", t.adam_beta2);
  require(t.adam_eps > 0, "--adam-eps must be positive, got {}", t.adam_eps);
  require(t.clip_grad >= 0, "--clip-grad must not be negative, got {}", t.clip_grad);
  require(t.log_interval > 0, "--log-interval must be positive, got {}", t.log_interval);
  require(t.skip_spike_factor == 0 || (t.skip_spike_factor > 1 && std::isfinite(t.skip_spike_factor)),
          "--skip-spike-factor must be 0 (off) or a finite number above 1, got {}", t.skip_spike_factor);
  require(t.skip_spike_window >= 1 && t.skip_spike_window <= 100000, "--skip-spike-window must be in [1, 100000], got {}",
          t.skip_spike_window);
  require(t.eval_interval >= 0 && t.eval_iters >= 0, "--eval-interval ({}) and --eval-iters ({}) must not be negative",
          t.eval_interval, t.eval_iters);
}

// Learning rate at 1-based `iteration`: linear warmup to lr, then decay to min_lr by
// lr_decay_iters (Megatron's shape; cosine: min + (lr - min)·(1 + cos(π·progress))/2).
inline double lr_at(const TrainConfig& t, int64_t iteration) {
  if (iteration <= t.lr_warmup_iters) return t.lr * iteration / t.lr_warmup_iters;
  const int64_t decay_iters = t.lr_decay_iters > 0 ? t.lr_decay_iters : t.train_iters;
  if (t.lr_decay_style == "constant" || decay_iters <= t.lr_warmup_iters) return t.lr;
  const double progress = std::min(1.0, double(iteration - t.lr_warmup_iters) / double(decay_iters - t.lr_warmup_iters));
  const double coeff = t.lr_decay_style == "linear" ? 1.0 - progress : 0.5 * (1.0 + std::cos(M_PI * progress));
  return t.min_lr + coeff * (t.lr - t.min_lr);
}

// AdamW with decoupled weight decay, as torch.optim.AdamW. Biases and norm weights (every
// 1-D parameter) are not decayed. State is plain tensors so checkpoints and ZeRO can see it.
struct AdamW {
  struct Slot {
    std::string name;
    torch::Tensor param, exp_avg, exp_avg_sq;
    bool decay;
    torch::Tensor grad;  // none: param.grad() (ZeRO, zero.hpp: a slice of the gradient shard)
    torch::Tensor gradient() const { return grad.defined() ? grad : param.grad(); }
  };
  std::vector<Slot> slots;
  int64_t step_count = 0;
  double beta1, beta2, eps, weight_decay;

  AdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, const TrainConfig& t)
      : beta1(t.adam_beta1), beta2(t.adam_beta2), eps(t.adam_eps), weight_decay(t.weight_decay) {
    for (const auto& [name, p] : named_params)
      slots.push_back({name, p, torch::zeros_like(p), torch::zeros_like(p), p.dim() >= 2, {}});
  }

  void step(double lr) {
    torch::NoGradGuard no_grad;
    ++step_count;
    for (const bool decay : {true, false}) {  // matrices are decayed; biases and norms are not
      std::vector<torch::Tensor> p, g, m, v;
      for (auto& s : slots)
        if (s.decay == decay && s.gradient().defined()) {
          p.push_back(s.param);
          g.push_back(s.gradient());
          m.push_back(s.exp_avg);
          v.push_back(s.exp_avg_sq);
        }
      if (p.empty()) continue;
      const double wd = decay ? weight_decay : 0.0;
      if (fused_adamw_available(p[0])) fused_adamw(p, g, m, v, step_count, lr, beta1, beta2, wd, eps);  // compat.hpp
      else if (adamw_one_pass_applies(p, g, m, v)) adamw_one_pass(p, g, m, v, step_count, lr, beta1, beta2, wd, eps);
      else foreach_adamw(p, g, m, v, lr, wd);
    }
  }

  // The same update (formula: kernels.hpp's adamw_one_pass) with _foreach_ ops: a few kernels
  // for the whole model instead of a few per parameter, which matters on a GPU.
  void foreach_adamw(const Tensors& p, const Tensors& g, const Tensors& m, const Tensors& v, double lr, double wd) const {
    const double bias1 = 1.0 - std::pow(beta1, double(step_count));
    const double bias2 = 1.0 - std::pow(beta2, double(step_count));
    if (wd > 0) at::_foreach_mul_(p, 1.0 - lr * wd);
    at::_foreach_mul_(m, beta1);
    at::_foreach_add_(m, g, 1.0 - beta1);
    at::_foreach_mul_(v, beta2);
    at::_foreach_addcmul_(v, g, g, 1.0 - beta2);
    auto denom = at::_foreach_sqrt(v);
    at::_foreach_div_(denom, std::sqrt(bias2));
    at::_foreach_add_(denom, eps);
    at::_foreach_addcdiv_(p, m, denom, -lr / bias1);
  }

  // In place by default (data_parallel.hpp's gradients are views into its buckets);
  // set_to_none lets backward allocate them afresh, one pass less over the memory.
  void zero_grad(bool set_to_none = false) {
    for (auto& s : slots)
      if (set_to_none) s.param.mutable_grad() = torch::Tensor();
      else if (s.param.grad().defined()) s.param.mutable_grad().zero_();
  }
};

inline std::vector<std::pair<std::string, torch::Tensor>> named_parameters_of(torch::nn::Module& m) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : m.named_parameters()) out.emplace_back(p.key(), p.value());
  return out;
}

inline std::vector<torch::Tensor> parameters_of(const std::vector<std::pair<std::string, torch::Tensor>>& named) {
  std::vector<torch::Tensor> out;
  for (const auto& [name, p] : named) out.push_back(p);
  return out;
}

// Σ‖g‖² over the given gradients: a 0-dim fp64 tensor on their device, so that a GPU step
// need not wait for it (read it with .item() after the optimizer step, for logging).
inline torch::Tensor sq_norm(const std::vector<torch::Tensor>& tensors) {
  if (tensors.empty()) return torch::zeros({}, torch::kDouble);
  return torch::stack(at::_foreach_norm(tensors)).to(torch::kDouble).pow(2).sum();
}
inline std::vector<torch::Tensor> grads_of(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  return grads;
}
inline torch::Tensor grad_sq_norm(const std::vector<torch::Tensor>& params) { return sq_norm(grads_of(params)); }

// Σ‖g‖² of this rank's share of a model split over tp ranks, so that summing the results over
// the tp group counts every parameter once: a shard counts on every rank (the squares of the
// pieces add up to the full tensor's), a replicated parameter on tp rank 0 only.
inline std::vector<std::pair<std::string, torch::Tensor>> tp_share(
    const std::vector<std::pair<std::string, torch::Tensor>>& named_params, const std::set<std::string>& sharded,
    int64_t tp_rank) {
  std::vector<std::pair<std::string, torch::Tensor>> counted;
  for (const auto& [name, p] : named_params)
    if (tp_rank == 0 || sharded.count(name)) counted.emplace_back(name, p);
  return counted;
}
inline torch::Tensor tp_share_grad_sq_norm(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
                                           const std::set<std::string>& sharded, int64_t tp_rank) {
  return grad_sq_norm(parameters_of(tp_share(named_params, sharded, tp_rank)));
}

// [snippet: clip]
// Scales every gradient by min(1, max_norm / total_norm) (0 disables clipping).
inline void clip_gradients(std::vector<torch::Tensor> grads, const torch::Tensor& total_norm, double max_norm) {
  if (max_norm <= 0 || grads.empty()) return;
  torch::NoGradGuard no_grad;
  scale_tensors(grads, (max_norm / (total_norm + 1e-6)).clamp_max(1.0).to(grads[0].scalar_type()));
}
// [end snippet: clip]
inline void clip_grads(const std::vector<torch::Tensor>& params, const torch::Tensor& total_norm, double max_norm) {
  clip_gradients(grads_of(params), total_norm, max_norm);
}

// Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's
// 12·L·C·T (the two T×T matrix products, forward and backward), as nanoGPT and PaLM count.
inline double flops_per_token(int64_t num_params, int64_t num_layers, int64_t hidden, int64_t seq) {
  return 6.0 * double(num_params) + 12.0 * double(num_layers * hidden * seq);
}

// Peak memory in MiB: allocated on the GPU for a CUDA device, else this process's peak
// resident set (getrusage).
inline double peak_memory_mib(const torch::Device& device = torch::kCPU) {
  if (device.is_cuda()) return double(cuda_peak_bytes(device)) / (1024.0 * 1024.0);
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return double(usage.ru_maxrss) / 1024.0;
}

struct StepMetrics {
  int64_t iteration = 0, consumed_samples = 0, skipped_iterations = 0;
  double lr = 0, loss = 0, grad_norm = 0, ms_per_iter = 0, tokens_per_s = 0, tflops = 0, mfu = 0, peak_mib = 0;
};

// Writes the Megatron-style line to stdout, a JSON line to the metrics file and scalars to a
// TensorBoard event file in tensorboard_dir (rank 0 only; an empty path turns one off).
struct MetricsLog {
  std::FILE* file = nullptr;
  std::unique_ptr<TensorBoardWriter> tensorboard;
  std::string path_;
  explicit MetricsLog(const std::string& path, const std::string& tensorboard_dir = "") : path_(path) {
    if (global_rank() != 0) return;
    if (!path.empty()) {
      file = std::fopen(path.c_str(), "w");
      require(file != nullptr, "--metrics-file: cannot open '{}' for writing", path);
    }
    if (!tensorboard_dir.empty()) tensorboard = std::make_unique<TensorBoardWriter>(tensorboard_dir);
  }
  ~MetricsLog() {
    if (file) std::fclose(file);
  }
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  void log(const StepMetrics& m, int64_t train_iters) {
    print0(" iteration {:>6}/{:>6} | consumed samples {:>8} | lr {:.3e} | loss {:.6f} | grad norm {:.3f} |"
           " {:.1f} ms/iter | {:.0f} tokens/s | {:.3f} TFLOP/s | MFU {:.1f}% | peak mem {:.0f} MiB{}\n",
           m.iteration, train_iters, m.consumed_samples, m.lr, m.loss, m.grad_norm, m.ms_per_iter,
           m.tokens_per_s, m.tflops, 100.0 * m.mfu, m.peak_mib,
           m.skipped_iterations > 0 ? fmt::format(" | skipped {}", m.skipped_iterations) : std::string());
    // loss_hex: the exact double (%a), for bit-exact comparisons such as a resumed run's.
    // A NaN or inf is written as null (JSON has no such numbers); loss_hex still spells it.
    json(fmt::format("{{\"iteration\": {}, \"consumed_samples\": {}, \"lr\": {}, \"loss\": {}, "
                     "\"loss_hex\": \"{:a}\", \"grad_norm\": {}, \"ms_per_iter\": {:.4f}, \"tokens_per_s\": {:.2f}, "
                     "\"tflops\": {:.6f}, \"mfu\": {:.6f}, \"peak_mib\": {:.1f}, \"skipped_iterations\": {}}}",
                     m.iteration, m.consumed_samples, json_number(m.lr), json_number(m.loss), m.loss,
                     json_number(m.grad_norm), m.ms_per_iter, m.tokens_per_s, m.tflops, m.mfu, m.peak_mib,
                     m.skipped_iterations));
    scalars(m.iteration, {{"train/loss", m.loss}, {"train/lr", m.lr}, {"train/grad_norm", m.grad_norm},
                          {"perf/tokens_per_s", m.tokens_per_s}, {"perf/tflops", m.tflops}, {"perf/mfu", m.mfu},
                          {"memory/peak_mib", m.peak_mib}});
  }
  void log_eval(int64_t iteration, double loss) {
    print0(" validation at iteration {} | loss {:.6f} | ppl {:.3f}\n", iteration, loss, std::exp(loss));
    json(fmt::format("{{\"iteration\": {}, \"eval_loss\": {}}}", iteration, json_number(loss)));
    scalars(iteration, {{"eval/loss", loss}});
  }
  void scalars(int64_t step, std::initializer_list<std::pair<const char*, double>> tagged) {
    if (!tensorboard) return;
    for (const auto& [tag, value] : tagged) tensorboard->add_scalar(tag, step, value);
    tensorboard->flush();  // a live TensorBoard sees each step as it is logged
  }
  void json(const std::string& line) {
    if (!file) return;
    // a full disk shows at the flush: say so, rather than stop mid-line in silence
    if (std::fputs((line + "\n").c_str(), file) < 0 || std::fflush(file) != 0 || std::ferror(file))
      throw RuntimeFailure(fmt::format("rank {}: --metrics-file {}: writing failed ({})", global_rank(), path_,
                                       std::strerror(errno)));
  }
  // A JSON number, or null for NaN and inf (which JSON cannot hold).
  static std::string json_number(double x) { return std::isfinite(x) ? fmt::format("{:.9g}", x) : "null"; }
};

}  // namespace lightron
