// lightron/trainer.hpp — chapter 4: the composition, packaged. Chapters 1–3 wrote the step
// out in their examples; these are the same lines for any tp × dp × pp layout on the grid:
//   the whole model from the seed -> sharded over tp -> cut to this rank's pipeline stage
//   -> its attention a ring over cp (chapter 8) -> each step: this cp rank's chunks of the
//   micro-batches, the schedule's forwards and backwards -> gradients averaged over dp (x cp),
//   summed over tp for sequence-parallel replicas and over the first + last stage for a
//   tied embedding -> the global gradient norm, clipping -> AdamW.
// Every line of step() names the group it talks to.
// Leaves out: sampling, gathering the full model and checkpoints (trainer_tools.hpp).
#pragma once

#include "context_parallel.hpp"
#include "data.hpp"
#include "data_parallel.hpp"
#include "guards.hpp"
#include "pipeline_engine.hpp"
#include "recompute.hpp"
#include "tp_model.hpp"
#include "train.hpp"
#include "zero3.hpp"

namespace lightron {

struct ParallelOptions {
  std::string ddp_impl = "bucketed";   // naive | bucketed
  int64_t ddp_bucket_size = 40000000;  // elements
  std::string sharding = "no_shard";   // no_shard | optim | optim_grads | optim_grads_params: ZeRO-1/2/3
  bool sequence_parallel = false;
  std::string pipeline_schedule = "1f1b";  // 1f1b | afab
  int64_t layers_per_virtual_stage = 0;    // > 0: interleaved 1f1b
  torch::Device device = torch::kCPU;      // cuda: NCCL groups, this rank's GPU
  bool bf16 = false;                       // bf16 compute, fp32 master weights, grads and Adam
  RecomputeOptions recompute;              // full | selective activation recomputation
  bool zigzag = true;                      // cp: the head-tail split (false: contiguous, unbalanced)
};

class Trainer {
 public:
  Trainer(const GPTConfig& model_config, const TrainConfig& train, const ParallelOptions& options,
          const ProcessGroups& groups)
      : train_(train), options_(options), groups_(groups) {
    const auto& l = groups.layout;
    require(zero_stage(options.sharding) < 3 || l.pp == 1, "--data-parallel-sharding-strategy optim_grads_params "
            "(ZeRO-3) needs --pipeline-model-parallel-size 1, got {}", l.pp);
    validate_pipeline(model_config.num_layers, l.pp, options.layers_per_virtual_stage,
                      train.accumulation_steps(l.dp), options.pipeline_schedule);
    const int64_t chunks = l.pp * virtual_stages(model_config.num_layers, l.pp, options.layers_per_virtual_stage);
    validate_recompute(options.recompute, model_config.num_layers / chunks);  // blocks per model chunk
    validate_context_parallel(model_config, l.cp, l.tp, options.sequence_parallel, options.recompute);
    // [snippet: trainer_compose]
    torch::manual_seed(train.seed);
    model = std::make_shared<GPT>(model_config);  // whole, from the seed: every layout starts here
    tp_info = apply_tensor_parallel(*model, groups.tp, options.sequence_parallel);  // tp: shard the layers
    stage = apply_pipeline_parallel(model, groups.coords.pp, l.pp,                   // pp: keep this stage's
                                    virtual_stages(model_config.num_layers, l.pp, options.layers_per_virtual_stage));
    stage.bf16 = options.bf16;
    apply_context_parallel(*model, groups.cp, split());  // cp: ring attention, this rank's positions
    apply_recompute(*model, options.recompute);  // recompute: fewer activations kept for backward
    model->to(options.device);  // after sharding: each rank moves only its part
    engine = std::make_unique<PipelineEngine>(stage, groups, model_config.hidden_size,
                                              options.sequence_parallel ? l.tp : 1);
    named_params = named_parameters_of(*model);  // this rank's: so is the optimizer state
    params = parameters_of(named_params);
    tp_info.sequence_parallel_params = held_here(tp_info.sequence_parallel_params, params);
    const Group& replicas = groups.dp_cp;  // dp (x cp): the ranks whose gradients are averaged
    if (const int zero = zero_stage(options.sharding); zero > 0 && replicas.size > 1) {  // ZeRO: 1/dp of the state each
      std::vector<std::string> names;
      for (const auto& [name, p] : named_params) names.push_back(name);
      const auto units = zero_units(names, zero, stage.holds_tied_embedding());
      distributed = std::make_unique<DistributedOptimizer>(named_params, replicas, train, zero, options.ddp_bucket_size, units);
      ddp = std::make_unique<BucketedDataParallel>(named_params, replicas, options.ddp_bucket_size,
                                                   distributed->communication());
      if (zero == 3) sharded_weights = ShardedWeights::apply(*model, *distributed, replicas);  // weights too
    } else if (options.ddp_impl == "bucketed" && replicas.size > 1) {  // dp: buckets overlapped with backward
      optimizer = std::make_unique<AdamW>(named_params, train);
      ddp = std::make_unique<BucketedDataParallel>(named_params, replicas, options.ddp_bucket_size);
    } else {
      optimizer = std::make_unique<AdamW>(named_params, train);
      for (auto& p : params) p.mutable_grad() = torch::zeros_like(p);
    }
    // [end snippet: trainer_compose]
    guard = std::make_unique<UpdateGuard>(train.check_for_nan_in_loss_and_grad, train.skip_spike_factor,
                                          train.skip_spike_window);
    guard->watch(ddp.get());
    plant_test_fault(named_params, groups.rank, guard->iteration());
  }

  // One optimizer step over this rank's micro-batches of a global batch; returns the loss
  // averaged over the whole global batch (the same number on every rank).
  double step(const std::vector<Batch>& micro_batches, int64_t iteration) {
    // [snippet: trainer_step]
    if (distributed) distributed->zero_grad();
    else optimizer->zero_grad(/*set_to_none=*/!ddp);
    guard->start_step(iteration);
    auto loss = forward_backward(to_device(micro_batches));  // pp: the schedule; tp: inside the layers
    const auto own_loss = stage.pp_rank + 1 == stage.pp_size ? loss : torch::Tensor();  // pp: the last stage's
    guard->note_own_numbers(own_loss, named_params, bool(ddp));  // guards: before any reduction mixes them
    if (ddp) ddp->finish();  // dp (x cp): the buckets' all-reduces (ZeRO: reduce-scatters), waited for
    else if (groups_.dp_cp.size > 1) all_reduce_gradients(params, groups_.dp_cp);  // dp (x cp): one all-reduce each
    if (!planted_bug("skip_sp_grad_all_reduce")) sum_over(groups_.tp, tp_info.sequence_parallel_params);  // tp: SP replicas
    if (stage.holds_tied_embedding() && !planted_bug("skip_embedding_all_reduce"))
      sum_over(groups_.embedding, {model->wte->weight});  // embedding: first + last stage
    all_reduce(groups_.dp_cp, loss, /*average=*/true);  // dp (x cp): the loss of the global batch
    const auto counted_once = stage.counted_once(named_params);  // pp: a tied embedding once
    auto sq = distributed ? distributed->grad_sq_norm(tp_share(counted_once, tp_info.sharded, groups_.tp.rank))
                          : tp_share_grad_sq_norm(counted_once, tp_info.sharded, groups_.tp.rank);
    sq = sq.to(options_.device);
    if (distributed) all_reduce(groups_.dp_cp, sq);  // ZeRO: each dp (x cp) rank its slices
    all_reduce(groups_.tp, sq);  // tp: the shards of a layer add up
    all_reduce(groups_.pp, sq);  // pp: each stage its own layers
    const auto norm = sq.sqrt();  // stays on the device: no wait before the update (unless guarded)
    updated = !guard->checks_anything() ||  // guards: a NaN/inf stops every rank, a spike skips the update
              guard->allow_update(loss.item<double>(), norm.item<double>(), iteration, groups_.world);
    if (updated && distributed) {
      distributed->step(lr_at(train_, iteration), norm, train_.clip_grad);  // ZeRO: update the slices, all-gather
    } else if (updated) {
      clip_grads(params, norm, train_.clip_grad);
      optimizer->step(lr_at(train_, iteration));
    }
    grad_norm = norm.item<double>();
    return loss.item<double>();
    // [end snippet: trainer_step]
  }

  // Mean loss over the micro-batches, no gradients (the same number on every rank).
  double evaluate(const std::vector<Batch>& cpu_batches) {
    torch::NoGradGuard no_grad;
    const auto micro_batches = to_device(cpu_batches);
    torch::Tensor total = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(options_.device));
    if (groups_.layout.pp > 1) {
      total = engine->run(micro_batches, "afab", /*train=*/false);
    } else {
      AutocastGuard autocast(options_.bf16);
      for (const auto& b : micro_batches) total += model->loss(b.tokens, b.labels).to(torch::kDouble);
      total /= double(micro_batches.size());
    }
    all_reduce(groups_.dp_cp, total, /*average=*/true);
    return total.item<double>();
  }

  const TrainConfig& train_config() const { return train_; }
  const ParallelOptions& options() const { return options_; }
  const ProcessGroups& groups() const { return groups_; }
  SequenceSplit split() const { return {groups_.layout.cp, options_.zigzag}; }  // cp: who holds which chunks

  std::shared_ptr<GPT> model;  // this rank's part of it
  TensorParallelInfo tp_info;
  PipelineStage stage;
  std::unique_ptr<PipelineEngine> engine;
  std::vector<std::pair<std::string, torch::Tensor>> named_params;
  std::vector<torch::Tensor> params;
  std::unique_ptr<AdamW> optimizer;                  // null under ZeRO: then
  std::unique_ptr<DistributedOptimizer> distributed;  // holds this rank's slices of the AdamW state
  std::shared_ptr<ShardedWeights> sharded_weights;   // ZeRO-3: gathers the weights block by block
  // While it lives every weight is whole (no-op unless ZeRO-3): checkpoints, samples, hashes.
  WholeWeights whole_weights() { return WholeWeights(sharded_weights); }
  std::unique_ptr<BucketedDataParallel> ddp;
  std::unique_ptr<UpdateGuard> guard;  // NaN/inf and spikes (guards.hpp); on the heap: ddp's hook points at it
  double grad_norm = 0;
  bool updated = true;  // false when the guard skipped the last step's update
  // The most bytes the last step's forwards left alive for backward at once, on this rank
  // (measured with CountingCPUAllocator installed, activation_meter.hpp; else 0).
  int64_t peak_activation_bytes() const { return stage.pp_size > 1 ? engine->peak_activation_bytes : peak_activation_bytes_; }

 private:
  // Forward and backward of every micro-batch; the loss averaged over them (double, on the device).
  torch::Tensor forward_backward(const std::vector<Batch>& micro_batches) {
    if (stage.pp_size > 1) return engine->run(micro_batches, options_.pipeline_schedule, /*train=*/true, ddp.get());
    auto total = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(options_.device));
    peak_activation_bytes_ = 0;
    for (size_t i = 0; i < micro_batches.size(); ++i) {
      BucketedDataParallel::NoSync no_sync;
      if (ddp && i + 1 < micro_batches.size()) no_sync = ddp->no_sync();  // communicate after the last only
      torch::Tensor loss;
      {
        AutocastGuard autocast(options_.bf16);  // forward only, as torch.autocast
        CountAllocations count(activations_);
        loss = model->loss(micro_batches[i].tokens, micro_batches[i].labels) / double(micro_batches.size());
      }
      peak_activation_bytes_ = std::max(peak_activation_bytes_, activations_->settled());
      loss.backward();
      total += loss.detach().to(torch::kDouble);
    }
    return total;
  }

  // Sums the gradients of parameters replicated over `g` (whole, or ZeRO's slices of them).
  void sum_over(const Group& g, const std::vector<torch::Tensor>& shared) {
    if (distributed) return distributed->sum_over(g, shared);
    for (const auto& p : shared) all_reduce(g, p.grad());
  }
  static std::vector<torch::Tensor> held_here(const std::vector<torch::Tensor>& some, const std::vector<torch::Tensor>& held) {
    std::vector<torch::Tensor> out;
    for (const auto& t : some)
      if (std::any_of(held.begin(), held.end(), [&](const torch::Tensor& p) { return p.is_same(t); })) out.push_back(t);
    return out;
  }
  std::vector<Batch> to_device(const std::vector<Batch>& batches) const {
    std::vector<Batch> out;
    for (const auto& b : batches) {
      const Batch mine = groups_.cp.size > 1 ? context_chunks(b, groups_.cp.rank, split()) : b;  // cp: its chunks
      out.push_back({mine.tokens.to(options_.device), mine.labels.to(options_.device)});
    }
    return out;
  }

  TrainConfig train_;
  ParallelOptions options_;
  ProcessGroups groups_;  // a copy (groups share their backends): the caller's may go
  std::shared_ptr<ActivationCounter> activations_ = std::make_shared<ActivationCounter>();
  int64_t peak_activation_bytes_ = 0;
};

}  // namespace lightron
