// lightron/data_parallel.hpp — data parallelism: every data-parallel rank holds the same
// model, runs its own slice of the global batch, and the gradients are averaged across the
// dp group before the optimizer step, so every replica takes the same step.
//
// Two versions, for teaching:
//   * all_reduce_gradients: after backward, all-reduce every gradient and divide by dp.
//   * BucketedDataParallel: gradients live in a few flat buckets (--ddp-bucket-size
//     elements each). A hook on each parameter's gradient accumulator counts the gradients
//     that are ready; when a bucket is complete its all-reduce starts right away, while
//     backward is still computing earlier layers' gradients. finish() waits before the
//     optimizer step. With gradient accumulation only the last micro-batch communicates.
// Also: check_replicas, which hashes the parameters and names a replica that diverged.
// Leaves out: ZeRO (sharding the optimizer state). Introduced in tutorial stage 1.
#pragma once

#include "process_groups.hpp"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

namespace lightron {

// The naive version: one all-reduce per parameter, after the whole backward.
inline void all_reduce_gradients(const std::vector<torch::Tensor>& params, const Group& dp) {
  for (const auto& p : params)
    if (p.grad().defined()) all_reduce(dp, p.grad(), /*average=*/true);
}

class BucketedDataParallel {
 public:
  // `params` in the model's order; buckets are filled from the last parameter backwards,
  // the order in which backward produces their gradients.
  BucketedDataParallel(const std::vector<torch::Tensor>& params, const Group& dp, int64_t bucket_elements)
      : dp_(dp) {
    require(bucket_elements > 0, "--ddp-bucket-size must be positive, got {}", bucket_elements);
    for (auto it = params.rbegin(); it != params.rend(); ++it) {
      if (buckets_.empty() || buckets_.back().elements + it->numel() > bucket_elements) buckets_.emplace_back();
      buckets_.back().params.push_back(*it);
      buckets_.back().elements += it->numel();
    }
    for (size_t b = 0; b < buckets_.size(); ++b) {
      auto& bucket = buckets_[b];
      bucket.flat = torch::zeros({bucket.elements}, bucket.params[0].options());
      int64_t offset = 0;
      for (auto& p : bucket.params) {
        // The gradient is a view into the bucket: autograd accumulates into it in place.
        p.mutable_grad() = bucket.flat.narrow(0, offset, p.numel()).view_as(p);
        offset += p.numel();
        auto accumulator = torch::autograd::impl::grad_accumulator(p);
        accumulator->add_post_hook(std::make_unique<ReadyHook>(this, b));
        accumulators_.push_back(accumulator);  // the parameter only holds it weakly
      }
    }
  }
  BucketedDataParallel(const BucketedDataParallel&) = delete;
  BucketedDataParallel& operator=(const BucketedDataParallel&) = delete;

  // Call before each micro-batch's backward: communicate only after the last one.
  void set_sync(bool sync) {
    sync_ = sync;
    for (auto& bucket : buckets_) bucket.ready = 0;
  }

  // Before the optimizer step: launch buckets that never filled (unused parameters), then
  // wait for every all-reduce. Gradients are then averaged over the dp group.
  void finish() {
    for (auto& bucket : buckets_)
      if (!bucket.pending.work && bucket.ready < bucket.params.size()) launch(bucket);
    for (auto& bucket : buckets_) bucket.pending.wait();
  }

  size_t num_buckets() const { return buckets_.size(); }

 private:
  struct Bucket {
    std::vector<torch::Tensor> params;
    int64_t elements = 0;
    torch::Tensor flat;
    size_t ready = 0;
    Pending pending;
  };

  struct ReadyHook : torch::autograd::FunctionPostHook {
    BucketedDataParallel* self;
    size_t bucket;
    ReadyHook(BucketedDataParallel* s, size_t b) : self(s), bucket(b) {}
    torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                              const torch::autograd::variable_list& /*inputs*/) override {
      self->on_ready(bucket);
      return outputs;
    }
  };

  void on_ready(size_t b) {
    auto& bucket = buckets_[b];
    if (sync_ && ++bucket.ready == bucket.params.size()) launch(bucket);
  }
  void launch(Bucket& bucket) { bucket.pending = all_reduce_async(dp_, bucket.flat, /*average=*/true); }

  const Group& dp_;
  std::vector<Bucket> buckets_;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;
  bool sync_ = true;
};

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
