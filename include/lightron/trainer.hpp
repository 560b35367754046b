// lightron/trainer.hpp — the composition (tutorial stage 4): one training step for any
// tp × dp × pp layout on the grid. It builds the whole model from the seed (so every layout
// starts from the single-device weights), shards it (tensor_parallel), cuts it to this
// rank's pipeline stage (pipeline_parallel), and then each step runs
//     forward/backward over this rank's micro-batches (a pipeline schedule when pp > 1)
//  -> gradients averaged over dp (data_parallel), summed over tp for sequence-parallel
//     replicas, and over the first+last stage for tied embeddings
//  -> the global gradient norm, each parameter counted once across the grid, and clipping
//  -> AdamW with the scheduled learning rate.
// examples/pretrain_gpt.cpp and the parity tests drive this class.
#pragma once

#include "checkpoint_load.hpp"
#include "data.hpp"
#include "data_parallel.hpp"
#include "pipeline_schedule.hpp"
#include "tp_model.hpp"
#include "train.hpp"

#include <map>

namespace lightron {

struct ParallelOptions {
  std::string ddp_impl = "bucketed";   // naive | bucketed
  int64_t ddp_bucket_size = 40000000;  // elements
  bool sequence_parallel = false;
  std::string pipeline_schedule = "1f1b";  // 1f1b | afab
  int64_t layers_per_virtual_stage = 0;    // > 0: interleaved 1f1b
  torch::Device device = torch::kCPU;      // cuda: NCCL groups, this rank's GPU
  bool bf16 = false;                       // bf16 compute, fp32 master weights, grads and Adam
};

class Trainer {
 public:
  Trainer(const GPTConfig& model_config, const TrainConfig& train, const ParallelOptions& options,
          const ProcessGroups& groups)
      : train_(train), options_(options), groups_(groups) {
    const auto& l = groups.layout;
    validate_pipeline(model_config.num_layers, l.pp, options.layers_per_virtual_stage,
                      train.accumulation_steps(l.dp), options.pipeline_schedule);
    torch::manual_seed(train.seed);
    model = std::make_shared<GPT>(model_config);  // whole, from the seed: every layout starts here
    tp_info = apply_tensor_parallel(*model, groups.tp, options.sequence_parallel);
    stage = apply_pipeline_parallel(model, groups.coords.pp, l.pp,
                                    virtual_stages(model_config.num_layers, l.pp, options.layers_per_virtual_stage));
    stage.bf16 = options.bf16;
    model->to(options.device);  // after sharding: each rank moves only its part
    engine = std::make_unique<PipelineEngine>(stage, groups, model_config.hidden_size,
                                              options.sequence_parallel ? l.tp : 1);
    named_params = named_parameters_of(*model);
    for (auto& [name, p] : named_params) params.push_back(p);
    auto& sp = tp_info.sequence_parallel_params;  // keep those of this stage's layers only
    sp.erase(std::remove_if(sp.begin(), sp.end(), [&](const torch::Tensor& t) {
      return std::none_of(params.begin(), params.end(), [&](const torch::Tensor& p) { return p.is_same(t); });
    }), sp.end());
    optimizer = std::make_unique<AdamW>(named_params, train);
    if (options.ddp_impl == "bucketed" && groups.dp.size > 1)
      ddp = std::make_unique<BucketedDataParallel>(named_params, groups.dp, options.ddp_bucket_size);
    else
      for (auto& p : params) p.mutable_grad() = torch::zeros_like(p);
  }

  // One optimizer step over this rank's micro-batches of a global batch; returns the loss
  // averaged over the whole global batch (the same number on every rank).
  double step(const std::vector<Batch>& micro_batches, int64_t iteration) {
    optimizer->zero_grad(/*set_to_none=*/!ddp);
    auto loss = forward_backward(to_device(micro_batches));
    if (ddp) ddp->finish();
    else if (groups_.dp.size > 1) all_reduce_gradients(params, groups_.dp);
    for (auto& p : tp_info.sequence_parallel_params) all_reduce(groups_.tp, p.grad());
    if (auto wte = tied_embedding()) all_reduce(groups_.embedding, wte->grad());
    all_reduce(groups_.dp, loss, /*average=*/true);
    const auto norm = global_grad_norm();  // stays on the device: no wait before the update
    clip_grads(params, norm, train_.clip_grad);
    optimizer->step(lr_at(train_, iteration));
    grad_norm = norm.item<double>();
    return loss.item<double>();
  }

  // Mean loss over the micro-batches, no gradients (the same number on every rank).
  double evaluate(const std::vector<Batch>& cpu_batches) {
    torch::NoGradGuard no_grad;
    const auto micro_batches = to_device(cpu_batches);
    torch::Tensor total = scalar();
    if (groups_.layout.pp > 1) {
      total = engine->run(micro_batches, "afab", /*train=*/false);
    } else {
      AutocastGuard autocast(options_.bf16);
      for (const auto& b : micro_batches) total += model->loss(b.tokens, b.labels).to(torch::kDouble);
      total /= double(micro_batches.size());
    }
    all_reduce(groups_.dp, total, /*average=*/true);
    return total.item<double>();
  }

  // Full logits (1, t, V) of ids (1, t) on every rank: a collective, for generation. The
  // activation passes stage by stage; the last stage gathers the vocabulary and broadcasts.
  torch::Tensor forward_logits(torch::Tensor ids) {
    torch::NoGradGuard no_grad;
    ids = ids.to(options_.device);
    const int64_t t = ids.size(1), tp = groups_.layout.tp, p = stage.pp_size;
    const int64_t pad = options_.sequence_parallel ? (tp - t % tp) % tp : 0;  // T must split over tp
    if (pad > 0) ids = torch::cat({torch::zeros({1, pad}, ids.options()), ids}, 1);
    torch::Tensor x = ids;
    for (int64_t gc = 0; gc < p * stage.num_virtual; ++gc) {
      if (gc % p != stage.pp_rank) continue;
      if (gc > 0) {
        auto in = torch::empty({1, ids.size(1) / (options_.sequence_parallel ? tp : 1), model->config.hidden_size},
                               torch::TensorOptions().device(options_.device));
        recv_async(groups_.pp, in, int((gc - 1) % p), int(gc)).wait();
        x = in;
      }
      x = stage.forward_chunk(gc / p, x);
      if (gc + 1 < p * stage.num_virtual) send_async(groups_.pp, x.contiguous(), int((gc + 1) % p), int(gc + 1)).wait();
    }
    auto logits = torch::empty({1, ids.size(1), model->config.vocab_size}, torch::TensorOptions().device(options_.device));
    if (stage.has_head()) {
      AutocastGuard autocast(options_.bf16);
      logits = all_gather(groups_.tp, model->logits(x).to(torch::kFloat), 2);
    }
    broadcast(groups_.pp, logits, int(p - 1));
    return logits.narrow(1, pad, t).cpu();
  }

  // Every parameter as the single-device model holds it, on every rank (a collective):
  // tp shards are gathered and unsharded, each pipeline stage broadcasts its own.
  std::map<std::string, torch::Tensor> full_parameters() {
    std::map<std::string, torch::Tensor> mine, out;
    for (auto& [name, p] : named_params) {
      if (!tp_info.sharded.count(name)) {
        mine[name] = p.detach().clone();
        continue;
      }
      auto shards = all_gather(groups_.tp, p.detach().unsqueeze(0), 0).unbind(0);
      mine[name] = unshard(std::vector<torch::Tensor>(shards.begin(), shards.end()), tp_shard_spec(name, model->config));
    }
    if (stage.pp_size == 1) return mine;
    GPT whole(model->config);  // for the names and shapes only
    for (auto& p : whole.named_parameters()) {
      const int owner = owner_stage(p.key());
      auto t = owner == stage.pp_rank ? mine.at(p.key()) : torch::empty_like(p.value());
      broadcast(groups_.pp, t, owner);
      out[p.key()] = t;
    }
    return out;
  }

  // Sharded checkpoints (checkpoint.hpp): collectives; load() accepts any saving layout.
  void save(const std::string& dir, CheckpointCounters counters) {
    save_checkpoint(dir, counters, checkpoint_model(model->config), train_, *optimizer, groups_);
  }
  CheckpointCounters load(const std::string& dir, const LoadOptions& options = {}) {
    return load_checkpoint(dir, options, checkpoint_model(model->config), train_, *optimizer, groups_);
  }

  std::shared_ptr<GPT> model;  // this rank's part of it
  TensorParallelInfo tp_info;
  PipelineStage stage;
  std::unique_ptr<PipelineEngine> engine;
  std::vector<std::pair<std::string, torch::Tensor>> named_params;
  std::vector<torch::Tensor> params;
  std::unique_ptr<AdamW> optimizer;
  std::unique_ptr<BucketedDataParallel> ddp;
  double grad_norm = 0;

 private:
  // The pipeline stage that holds a parameter (by its global name).
  int owner_stage(const std::string& name) const {
    if (name.rfind("h.", 0) != 0) return name.rfind("wte.", 0) == 0 || name.rfind("wpe.", 0) == 0 ? 0 : int(stage.pp_size - 1);
    const int64_t layer = std::stoll(name.substr(2, name.find('.', 2) - 2));
    const auto chunks = chunk_layers(model->config.num_layers, stage.pp_size * stage.num_virtual);
    for (size_t c = 0; c < chunks.size(); ++c)
      if (std::find(chunks[c].begin(), chunks[c].end(), layer) != chunks[c].end()) return int(c % stage.pp_size);
    return 0;
  }

  // The last stage's copy of a tied wte (pp > 1, first or last stage), else null.
  const torch::Tensor* tied_embedding() const {
    if (stage.pp_size == 1 || !model->config.tied() || !model->wte) return nullptr;
    return &model->wte->weight;
  }

  // ‖g‖ over the whole model, each parameter counted once: tp shards add up; replicated
  // parameters count on tp rank 0 only; the last stage's copy of a tied wte not at all.
  torch::Tensor global_grad_norm() {
    auto counted = named_params;
    if (!stage.has_embedding())  // the last stage's copy of a tied wte: counted on the first
      counted.erase(std::remove_if(counted.begin(), counted.end(), [](auto& p) { return p.first == "wte.weight"; }),
                    counted.end());
    auto sq = tp_share_grad_sq_norm(counted, tp_info.sharded, groups_.tp.rank).to(options_.device);
    all_reduce(groups_.tp, sq);
    all_reduce(groups_.pp, sq);
    return sq.sqrt();
  }

  // A double on this rank's device (NCCL reduces device tensors only).
  torch::Tensor scalar(double value = 0) const {
    return torch::full({}, value, torch::TensorOptions().dtype(torch::kDouble).device(options_.device));
  }
  std::vector<Batch> to_device(const std::vector<Batch>& batches) const {
    std::vector<Batch> out;
    for (const auto& b : batches) out.push_back({b.tokens.to(options_.device), b.labels.to(options_.device)});
    return out;
  }

  torch::Tensor forward_backward(const std::vector<Batch>& micro_batches) {
    if (stage.pp_size > 1) {
      BucketedDataParallel::NoSync no_sync;  // buckets are all-reduced in finish(), after the last backward
      if (ddp) no_sync = ddp->no_sync();
      return engine->run(micro_batches, options_.pipeline_schedule, /*train=*/true);
    }
    auto total = scalar();
    const double n = double(micro_batches.size());
    for (size_t i = 0; i < micro_batches.size(); ++i) {
      BucketedDataParallel::NoSync no_sync;
      if (ddp && i + 1 < micro_batches.size()) no_sync = ddp->no_sync();  // communicate after the last only
      torch::Tensor loss;
      {
        AutocastGuard autocast(options_.bf16);  // forward only, as torch.autocast
        loss = model->loss(micro_batches[i].tokens, micro_batches[i].labels) / n;
      }
      loss.backward();
      total += loss.detach().to(torch::kDouble);
    }
    return total;
  }

  TrainConfig train_;
  ParallelOptions options_;
  ProcessGroups groups_;  // a copy (groups share their backends): the caller's may go
};

}  // namespace lightron
