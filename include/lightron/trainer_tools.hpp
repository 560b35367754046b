// lightron/trainer_tools.hpp — what a training program does around the step, for a Trainer
// on any layout: the full logits of a prompt (for sampling), every parameter as one device
// holds it (for checks and exports), sharded checkpoints, and on the CPU the matrix-multiply
// rate that MFU is taken against. All of them are collectives:
// every rank of the grid calls them. Plumbing, not a chapter's idea: skim it.
#pragma once

#include "checkpoint_load.hpp"
#include "trainer.hpp"

#include <map>

namespace lightron {

// The fp32 matrix-multiply rate this rank reaches, in TFLOP/s: the best of three 1024³
// products (after one untimed), all ranks at once after a barrier, so that ranks sharing cores
// share the rate as they share the step. CPUs and BLAS kernels differ too much for a constant
// (2 threads on one AMD EPYC: ~0.2 with OpenBLAS's Haswell kernel, ~0.38 with Cooperlake's;
// bench/gemm_peak.py). Constant inputs: the random number streams stay untouched.
inline double measured_gemm_tflops(const Group& world) {
  torch::NoGradGuard no_grad;
  const int64_t n = 1024;
  const auto a = torch::full({n, n}, 0.5f), b = torch::full({n, n}, 0.25f);
  auto c = torch::empty({n, n});
  barrier(world);
  double best = 0;
  for (int i = 0; i < 4; ++i) {
    Timer timer;
    at::mm_out(c, a, b);
    if (i > 0) best = std::max(best, 2.0 * double(n * n * n) / timer.seconds() / 1e12);
  }
  return best;
}

// Full logits (1, t, V) of ids (1, t) on every rank, for generation. The activation passes
// stage by stage (pp); the last stage gathers the vocabulary (tp) and broadcasts it (pp); cp
// ranks run their chunks and gather the sequence. Padding goes on the right, where the causal
// mask keeps it from changing the logits of the tokens before it.
inline torch::Tensor full_logits(Trainer& trainer, torch::Tensor ids) {
  torch::NoGradGuard no_grad;
  const auto weights = trainer.whole_weights();  // ZeRO-3
  const auto& o = trainer.options();
  const auto& g = trainer.groups();
  auto& stage = trainer.stage;
  const auto& config = trainer.model->config;
  ids = ids.to(o.device);
  const int64_t t = ids.size(1), tp = g.layout.tp, cp = g.layout.cp, p = stage.pp_size, chunks = p * stage.num_virtual;
  const int64_t multiple = (cp > 1 ? 2 * cp : 1) * (o.sequence_parallel ? tp : 1);  // T must split over cp and tp
  const int64_t pad = (multiple - t % multiple) % multiple;
  if (pad > 0) ids = torch::cat({ids, torch::zeros({1, pad}, ids.options())}, 1);
  if (cp > 1) ids = sequence_chunks(ids, g.cp.rank, trainer.split());
  const auto on_device = torch::TensorOptions().device(o.device);
  torch::Tensor x = ids;
  for (int64_t gc = 0; gc < chunks; ++gc) {
    if (gc % p != stage.pp_rank) continue;
    if (gc > 0) {
      x = torch::empty({1, ids.size(1) / (o.sequence_parallel ? tp : 1), config.hidden_size}, on_device);
      recv_async(g.pp, x, int((gc - 1) % p), int(gc)).wait();
    }
    x = stage.forward_chunk(gc / p, x);
    if (gc + 1 < chunks) send_async(g.pp, x.contiguous(), int((gc + 1) % p), int(gc + 1)).wait();
  }
  auto logits = torch::empty({1, ids.size(1), config.vocab_size}, on_device);
  if (stage.has_head()) {
    AutocastGuard autocast(o.bf16);
    logits = all_gather(g.tp, trainer.model->logits(x).to(torch::kFloat), 2);
  }
  broadcast(g.pp, logits, int(p - 1));
  if (cp > 1) {  // the cp ranks' chunks, back in sequence order
    std::vector<torch::Tensor> at;
    for (int64_t r = 0; r < cp; ++r) at.push_back(positions_of(r, trainer.split(), ids.size(1), o.device));
    const auto gathered = all_gather(g.cp, logits, 1);
    logits = torch::empty_like(gathered).index_copy_(1, torch::cat(at), gathered);
  }
  return logits.narrow(1, 0, t).cpu();
}

// Every parameter as the single-device model holds it, on every rank: tp shards are
// gathered and unsharded, and each parameter is broadcast from the pipeline rank that owns it.
inline std::map<std::string, torch::Tensor> full_parameters(Trainer& trainer) {
  const auto& g = trainer.groups();
  const auto& stage = trainer.stage;
  const auto& config = trainer.model->config;
  std::map<std::string, torch::Tensor> mine, out;
  const auto weights = trainer.whole_weights();  // ZeRO-3
  for (auto& [name, p] : trainer.named_params) {
    if (!trainer.tp_info.sharded.count(name)) {
      mine[name] = p.detach().clone();
      continue;
    }
    auto shards = all_gather(g.tp, p.detach().unsqueeze(0), 0).unbind(0);
    mine[name] = unshard(std::vector<torch::Tensor>(shards.begin(), shards.end()), tp_shard_spec(name, config));
  }
  if (stage.pp_size == 1) return mine;
  GPT whole(config);  // for the names and shapes only
  for (auto& p : whole.named_parameters()) {
    const auto owner = pp_rank_of_parameter(p.key(), config.num_layers, stage.pp_size, stage.num_virtual);
    auto t = owner == stage.pp_rank ? mine.at(p.key()) : torch::empty_like(p.value());
    broadcast(g.pp, t, int(owner));
    out[p.key()] = t;
  }
  return out;
}

// Sharded checkpoints (checkpoint.hpp); load_checkpoint accepts any saving layout. Under ZeRO
// the AdamW state is gathered whole over dp for saving and sliced again after loading, so the
// files are those of plain data parallelism.
inline void save_checkpoint(const std::string& dir, CheckpointCounters counters, Trainer& trainer) {
  const auto model = checkpoint_model(trainer.model->config, trainer.stage.num_virtual);
  if (!trainer.distributed)
    return save_checkpoint(dir, counters, model, trainer.train_config(), *trainer.optimizer, trainer.groups());
  const auto weights = trainer.whole_weights();  // ZeRO-3: gathered while saving
  const AdamW whole = trainer.distributed->consolidated(trainer.named_params, trainer.train_config());
  save_checkpoint(dir, counters, model, trainer.train_config(), whole, trainer.groups());
}
inline CheckpointCounters load_checkpoint(const std::string& dir, Trainer& trainer, const LoadOptions& options = {}) {
  const auto model = checkpoint_model(trainer.model->config, trainer.stage.num_virtual);
  if (!trainer.distributed)
    return load_checkpoint(dir, options, model, trainer.train_config(), *trainer.optimizer, trainer.groups());
  const auto weights = trainer.whole_weights();  // ZeRO-3: gathered, to load into
  AdamW whole(trainer.named_params, trainer.train_config());  // loads the weights in place, and the moments whole
  const auto counters = load_checkpoint(dir, options, model, trainer.train_config(), whole, trainer.groups());
  trainer.distributed->load_consolidated(whole);
  return counters;
}

}  // namespace lightron
