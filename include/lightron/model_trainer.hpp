// lightron/model_trainer.hpp — the training step of chapters 1 and 2 for *any* model: a
// torch::nn::Module with `torch::Tensor loss(const torch::Tensor& ids, const torch::Tensor& labels)`
// and named parameters, already split for this tp rank (built from ColumnParallelLinear /
// RowParallelLinear, or cut from a full model with column_parallel_from / row_parallel_from).
// Each step:
//     forward/backward over this rank's micro-batches (no_sync() for all but the last)
//  -> gradients averaged over dp (BucketedDataParallel)
//  -> the global gradient norm: shards' squares summed over tp, replicated parameters once
//  -> NaN/inf stop the job, a spike skips the update (guards.hpp, as in Trainer)
//  -> clipping, AdamW with the scheduled learning rate.
// Checkpoints read how each parameter splits from the tensor-parallel layers themselves, so
// a run saved at tp 2 loads at tp 1 and back. parity.hpp compares a layout with one rank.
// Leaves out: pipeline parallelism (it needs the model cut into stages: lightron's GPT and
// Trainer do that) and sequence parallelism. Introduced in tutorial chapter 6.
#pragma once

#include "checkpoint_load.hpp"
#include "data.hpp"
#include "data_parallel.hpp"
#include "guards.hpp"

namespace lightron {

template <typename Model>
class ModelTrainer {
 public:
  // `description` goes into checkpoints; a load compares it (e.g. the model's sizes).
  ModelTrainer(std::shared_ptr<Model> m, const TrainConfig& train, const ProcessGroups& groups,
               nlohmann::json description = nlohmann::json::object(), int64_t bucket_elements = 40000000)
      : model(std::move(m)), train_(train), groups_(groups), description_(std::move(description)) {
    require(groups.layout.pp == 1 && groups.layout.cp == 1, "ModelTrainer trains on tp x dp layouts: got pp {} and cp {} "
            "(a pipeline needs the model cut into stages: lightron's GPT with Trainer does that)",
            groups.layout.pp, groups.layout.cp);
    named_params = named_parameters_of(*model);
    for (const auto& [name, p] : named_params) params.push_back(p);
    for (const auto& [name, spec] : tp_shard_specs(*model))
      if (spec.dim >= 0 && groups.tp.size > 1) sharded.insert(name);
    optimizer = std::make_unique<AdamW>(named_params, train);
    if (groups.dp.size > 1) ddp = std::make_unique<BucketedDataParallel>(named_params, groups.dp, bucket_elements);
    guard = std::make_unique<UpdateGuard>(train.check_for_nan_in_loss_and_grad, train.skip_spike_factor,
                                          train.skip_spike_window);
    guard->watch(ddp.get());
  }

  // One optimizer step over this rank's micro-batches of a global batch; returns the loss
  // averaged over the global batch (the same number on every rank); sets grad_norm.
  double step(const std::vector<Batch>& micro_batches, int64_t iteration) {
    optimizer->zero_grad();
    guard->start_step(iteration);
    auto loss = torch::zeros({}, torch::kDouble);
    for (size_t i = 0; i < micro_batches.size(); ++i) {
      BucketedDataParallel::NoSync no_sync;
      if (ddp && i + 1 < micro_batches.size()) no_sync = ddp->no_sync();  // only the last backward communicates
      auto micro_loss = model->loss(micro_batches[i].tokens, micro_batches[i].labels) / double(micro_batches.size());
      micro_loss.backward();
      loss += micro_loss.detach().to(torch::kDouble);
    }
    guard->note_own_numbers(loss, named_params, bool(ddp));  // NaN checks, before any reduction
    if (ddp) ddp->finish();                               // dp: gradients averaged
    all_reduce(groups_.dp, loss, /*average=*/true);       // dp: for the log line
    auto sq = tp_share_grad_sq_norm(named_params, sharded, groups_.tp.rank);
    all_reduce(groups_.tp, sq);                           // tp: each parameter counted once
    const auto norm = sq.sqrt();
    updated = !guard->checks_anything() ||  // guards.hpp: a NaN/inf stops every rank, a spike skips
              guard->allow_update(loss.item<double>(), norm.item<double>(), iteration, groups_.world);
    if (updated) {
      clip_grads(params, norm, train_.clip_grad);
      optimizer->step(lr_at(train_, iteration));
    }
    grad_norm = norm.item<double>();
    return loss.item<double>();
  }

  // Every parameter as one rank would hold it, on every rank (a collective over tp).
  std::map<std::string, torch::Tensor> full_parameters() const {
    std::map<std::string, torch::Tensor> out;
    const auto specs = tp_shard_specs(*model);
    for (const auto& [name, p] : named_params) {
      if (!sharded.count(name)) {
        out[name] = p.detach().clone();
        continue;
      }
      auto shards = all_gather(groups_.tp, p.detach().unsqueeze(0), 0).unbind(0);
      out[name] = unshard(std::vector<torch::Tensor>(shards.begin(), shards.end()), specs.at(name));
    }
    return out;
  }

  // Sharded checkpoints (checkpoint.hpp), collectives over every rank; any tp x dp layout loads them.
  void save(const std::string& dir, CheckpointCounters counters) const {
    save_checkpoint(dir, counters, checkpoint_model(*model, description_), train_, *optimizer, groups_);
  }
  CheckpointCounters load(const std::string& dir, const LoadOptions& options = {}) {
    return load_checkpoint(dir, options, checkpoint_model(*model, description_), train_, *optimizer, groups_);
  }

  std::shared_ptr<Model> model;
  std::vector<std::pair<std::string, torch::Tensor>> named_params;
  std::vector<torch::Tensor> params;
  std::set<std::string> sharded;  // parameters split over tp (their squares add up across it)
  std::unique_ptr<AdamW> optimizer;
  std::unique_ptr<BucketedDataParallel> ddp;  // null at dp 1
  std::unique_ptr<UpdateGuard> guard;         // NaN/inf and spikes; on the heap: ddp's hook points at it
  double grad_norm = 0;
  bool updated = true;  // false when the guard skipped the last step's update

 private:
  TrainConfig train_;
  ProcessGroups groups_;  // a copy: groups share their backends
  nlohmann::json description_;
};

// The question parity.hpp's record_run asks of any trainer, as a free function like
// Trainer's (trainer_tools.hpp).
template <typename Model>
inline std::map<std::string, torch::Tensor> full_parameters(const ModelTrainer<Model>& trainer) {
  return trainer.full_parameters();
}

}  // namespace lightron
