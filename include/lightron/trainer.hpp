// lightron/trainer.hpp — the composition (tutorial stage 4): one training step for any
// layout on the grid. It builds the whole model from the seed (so every layout starts from
// the single-device weights), applies the parallelism the layout asks for, and runs
//     forward/backward over this rank's micro-batches
//  -> finish the data-parallel gradient all-reduce
//  -> global gradient norm (each parameter counted once across the grid) and clipping
//  -> AdamW with the scheduled learning rate.
// examples/pretrain_gpt.cpp and the parity tests both drive this class.
#pragma once

#include "data.hpp"
#include "data_parallel.hpp"
#include "gpt.hpp"
#include "tp_model.hpp"
#include "train.hpp"

#include <filesystem>
#include <map>
#include <fstream>

namespace lightron {

struct ParallelOptions {
  std::string ddp_impl = "bucketed";   // naive | bucketed
  int64_t ddp_bucket_size = 40000000;  // elements
  bool sequence_parallel = false;
};

class Trainer {
 public:
  Trainer(const GPTConfig& model_config, const TrainConfig& train, const ParallelOptions& options,
          ProcessGroups& groups)
      : train_(train), options_(options), groups_(groups) {
    torch::manual_seed(train.seed);
    model = std::make_shared<GPT>(model_config);  // whole, from the seed: every layout starts here
    tp_info = apply_tensor_parallel(*model, groups.tp, options.sequence_parallel);
    named_params = named_parameters_of(*model);
    for (auto& [name, p] : named_params) params.push_back(p);
    optimizer = std::make_unique<AdamW>(named_params, train);
    if (options.ddp_impl == "bucketed" && groups.dp.size > 1)
      ddp = std::make_unique<BucketedDataParallel>(params, groups.dp, options.ddp_bucket_size);
    else
      for (auto& p : params) p.mutable_grad() = torch::zeros_like(p);
  }

  // One optimizer step over this rank's micro-batches of a global batch; returns the loss
  // averaged over the whole global batch (the same number on every rank).
  double step(const std::vector<Batch>& micro_batches, int64_t iteration) {
    optimizer->zero_grad();
    auto loss = forward_backward(micro_batches);
    if (ddp) ddp->finish();
    else if (groups_.dp.size > 1) all_reduce_gradients(params, groups_.dp);
    for (auto& p : tp_info.sequence_parallel_params) all_reduce(groups_.tp, p.grad());
    all_reduce(groups_.dp, loss, /*average=*/true);
    grad_norm = global_grad_norm();
    clip_grads(params, grad_norm, train_.clip_grad);
    optimizer->step(lr_at(train_, iteration));
    return loss.item<double>();
  }

  // Mean loss over the micro-batches, no gradients (the same number on every rank).
  double evaluate(const std::vector<Batch>& micro_batches) {
    torch::NoGradGuard no_grad;
    auto total = torch::zeros({}, torch::kDouble);
    for (const auto& b : micro_batches) total += model->loss(b.tokens, b.labels).to(torch::kDouble);
    total /= double(micro_batches.size());
    all_reduce(groups_.dp, total, /*average=*/true);
    return total.item<double>();
  }

  // Every parameter as the single-device model would hold it (a collective: call it on
  // every rank). Shards are gathered back by the chapters that made them.
  std::map<std::string, torch::Tensor> full_parameters() {
    std::map<std::string, torch::Tensor> out;
    for (auto& [name, p] : named_params) {
      if (!tp_info.sharded.count(name)) {
        out[name] = p.detach().clone();
        continue;
      }
      auto shards = all_gather(groups_.tp, p.detach().unsqueeze(0), 0).unbind(0);
      out[name] = unshard(std::vector<torch::Tensor>(shards.begin(), shards.end()), tp_shard_spec(name, model->config));
    }
    return out;
  }

  // A same-layout checkpoint: this rank's parameters, AdamW moments and counters in one
  // torch pickle file per rank (checkpoint.hpp adds resharding and safetensors).
  void save(const std::string& dir, int64_t iteration, int64_t consumed_samples) {
    std::filesystem::create_directories(dir);
    c10::Dict<std::string, torch::Tensor> state;
    for (auto& s : optimizer->slots) {
      state.insert("param." + s.name, s.param.detach());
      state.insert("exp_avg." + s.name, s.exp_avg);
      state.insert("exp_avg_sq." + s.name, s.exp_avg_sq);
    }
    state.insert("iteration", torch::tensor(iteration));
    state.insert("consumed_samples", torch::tensor(consumed_samples));
    state.insert("adam_step", torch::tensor(optimizer->step_count));
    const auto bytes = torch::pickle_save(state);
    const std::string path = fmt::format("{}/rank_{:05d}.pt", dir, groups_.rank);
    std::ofstream(path + ".tmp", std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    std::filesystem::rename(path + ".tmp", path);  // never a half-written file under the real name
  }

  // Returns {iteration, consumed_samples} of the checkpoint in `dir`.
  std::pair<int64_t, int64_t> load(const std::string& dir) {
    const std::string path = fmt::format("{}/rank_{:05d}.pt", dir, groups_.rank);
    std::ifstream in(path, std::ios::binary);
    require(in.good(), "--load: {} not found (was it saved with the same number of ranks?)", path);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    auto state = torch::pickle_load(bytes).toGenericDict();
    auto get = [&](const std::string& key) {
      require(state.contains(key), "--load: {} has no '{}' (a different model shape?)", path, key);
      return state.at(key).toTensor();
    };
    torch::NoGradGuard no_grad;
    for (auto& s : optimizer->slots) {
      auto saved = get("param." + s.name);
      require(saved.sizes() == s.param.sizes(), "--load: {} has shape {} in {}, the model has {}", s.name,
              fmt::join(saved.sizes(), "x"), path, fmt::join(s.param.sizes(), "x"));
      s.param.copy_(saved);
      s.exp_avg.copy_(get("exp_avg." + s.name));
      s.exp_avg_sq.copy_(get("exp_avg_sq." + s.name));
    }
    optimizer->step_count = get("adam_step").item<int64_t>();
    return {get("iteration").item<int64_t>(), get("consumed_samples").item<int64_t>()};
  }

  std::shared_ptr<GPT> model;
  TensorParallelInfo tp_info;
  std::vector<std::pair<std::string, torch::Tensor>> named_params;
  std::vector<torch::Tensor> params;
  std::unique_ptr<AdamW> optimizer;
  std::unique_ptr<BucketedDataParallel> ddp;
  double grad_norm = 0;

 private:
  // ‖g‖ over the whole model, each parameter counted once: shards add up across tp;
  // replicated parameters (identical on every tp rank) count on tp rank 0 only.
  double global_grad_norm() {
    std::vector<torch::Tensor> counted;
    for (auto& [name, p] : named_params)
      if (tp_info.sharded.count(name) || groups_.tp.rank == 0) counted.push_back(p);
    auto sq = torch::tensor(grad_sq_norm(counted), torch::kDouble);
    all_reduce(groups_.tp, sq);
    return std::sqrt(sq.item<double>());
  }

  torch::Tensor forward_backward(const std::vector<Batch>& micro_batches) {
    auto total = torch::zeros({}, torch::kDouble);
    const double n = double(micro_batches.size());
    for (size_t i = 0; i < micro_batches.size(); ++i) {
      if (ddp) ddp->set_sync(i + 1 == micro_batches.size());  // communicate after the last only
      auto loss = model->loss(micro_batches[i].tokens, micro_batches[i].labels) / n;
      loss.backward();
      total += loss.detach().to(torch::kDouble);
    }
    return total;
  }

  TrainConfig train_;
  ParallelOptions options_;
  ProcessGroups& groups_;
};

}  // namespace lightron
