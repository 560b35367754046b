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
//     optimizer step. With gradient accumulation, backward inside no_sync() only accumulates
//     and the last micro-batch communicates; with a pipeline, PipelineEngine::run holds
//     no_sync() until this rank's last backward (pipeline_engine.hpp).
// Also: check_replicas, which hashes the parameters and names a replica that diverged.
// Leaves out: ZeRO (sharding the optimizer state). Chapter 1.
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

// Gradients live in flat buckets and each bucket's all-reduce starts as soon as backward has
// produced all of its gradients. Use, as PyTorch's DDP:
//     BucketedDataParallel ddp(named_parameters_of(model), groups->dp, bucket_elements);
//     for each micro-batch m:                 // gradient accumulation is explicit
//       BucketedDataParallel::NoSync no_sync;
//       if (m + 1 < micro_batches) no_sync = ddp.no_sync();  // earlier ones only accumulate
//       loss_m.backward();                    // the last one starts the all-reduces
//     ddp.finish();                           // gradients averaged over dp; ready for the next step
// The wrapper keeps no state across steps that the loop must reset: finish() re-arms it. A
// gradient set to none (zero_grad(set_to_none=true)) or replaced is moved back into its bucket
// by the hook; a backward without no_sync() waits for that bucket's previous all-reduce, so
// it costs communication, never correctness. Every rank must produce gradients for the same
// parameters in the same order (as DDP without find_unused_parameters).
class BucketedDataParallel {
  struct State;

 public:
  using NamedParams = std::vector<std::pair<std::string, torch::Tensor>>;

  // `params` in the model's order; buckets are filled from the last parameter backwards,
  // the order in which backward produces their gradients. The group is copied.
  BucketedDataParallel(const NamedParams& params, const Group& dp, int64_t bucket_elements)
      : state_(std::make_shared<State>()) {
    require(bucket_elements > 0, "--ddp-bucket-size must be positive, got {}", bucket_elements);
    state_->dp = dp;
    auto& buckets = state_->buckets;
    for (auto it = params.rbegin(); it != params.rend(); ++it) {
      const auto& [name, p] = *it;
      require(p.is_leaf() && p.requires_grad(), "BucketedDataParallel: parameter '{}' is not a leaf tensor that "
              "requires grad", name);
      if (buckets.empty() || buckets.back().elements + p.numel() > bucket_elements) buckets.emplace_back();
      buckets.back().names.push_back(name);
      buckets.back().params.push_back(p);
      buckets.back().elements += p.numel();
    }
    std::weak_ptr<State> weak = state_;
    for (size_t b = 0; b < buckets.size(); ++b) {
      auto& bucket = buckets[b];
      bucket.flat = torch::zeros({bucket.elements}, bucket.params[0].options());
      bucket.ready.assign(bucket.params.size(), false);
      int64_t offset = 0;
      for (size_t i = 0; i < bucket.params.size(); ++i) {
        auto& p = bucket.params[i];
        // The gradient is a view into the bucket: autograd accumulates into it in place.
        bucket.views.push_back(bucket.flat.narrow(0, offset, p.numel()).view_as(p));
        p.mutable_grad() = bucket.views.back();
        offset += p.numel();
        auto accumulator = torch::autograd::impl::grad_accumulator(p);
        accumulator->add_pre_hook(std::make_unique<Hook>(weak, b, i));
        accumulator->add_post_hook(std::make_unique<Hook>(weak, b, i));
        accumulators_.push_back(accumulator);  // the parameter only holds it weakly
      }
    }
  }
  BucketedDataParallel(const std::vector<torch::Tensor>& params, const Group& dp, int64_t bucket_elements)
      : BucketedDataParallel(numbered(params), dp, bucket_elements) {}
  BucketedDataParallel(const BucketedDataParallel&) = delete;
  BucketedDataParallel& operator=(const BucketedDataParallel&) = delete;

  // While a NoSync from no_sync() lives, backward only accumulates into the buckets; the
  // first backward after it communicates. A default-constructed NoSync does nothing.
  class NoSync {
   public:
    NoSync() = default;
    NoSync(NoSync&& other) noexcept : state_(std::move(other.state_)) {}
    NoSync& operator=(NoSync&& other) noexcept {
      release();
      state_ = std::move(other.state_);
      return *this;
    }
    ~NoSync() { release(); }

   private:
    friend class BucketedDataParallel;
    explicit NoSync(std::shared_ptr<State> s) : state_(std::move(s)) { state_->sync = false; }
    void release() {
      if (state_) state_->sync = true;
      state_.reset();
    }
    std::shared_ptr<State> state_;
  };
  NoSync no_sync() { return NoSync(state_); }

  // Before the optimizer step: bring every gradient into its bucket (a parameter that got no
  // gradient this step counts as zero), launch the buckets that backward did not, wait for
  // all of them. Gradients are then averaged over the dp group, and the wrapper is re-armed.
  void finish() {
    auto& buckets = state_->buckets;
    for (size_t b = 0; b < buckets.size(); ++b) {
      for (size_t i = 0; i < buckets[b].params.size(); ++i)
        if (!buckets[b].ready[i]) adopt(buckets[b], i, /*absent_is_zero=*/true);
      if (!buckets[b].pending.work) state_->launch(b);
    }
    for (size_t b = 0; b < buckets.size(); ++b) {
      buckets[b].wait_and_rearm();
      if (state_->observer) state_->observer(b, /*done=*/true);
    }
    state_->observer = nullptr;
  }

  size_t num_buckets() const { return state_->buckets.size(); }

  // `inspect(names, gradients)` is called with each bucket just before its all-reduce starts,
  // while the gradients are still this rank's own (guards.hpp notes NaN/inf there).
  using Inspect = std::function<void(const std::vector<std::string>&, const std::vector<torch::Tensor>&)>;
  void inspect_before_all_reduce(Inspect inspect) { state_->inspect = std::move(inspect); }

  // Until finish() returns, `observer(bucket, done)` is called when a bucket's all-reduce
  // starts (done = false) and when finish() has waited for it (done = true): for timelines.
  void observe_this_step(std::function<void(size_t bucket, bool done)> observer) {
    state_->observer = std::move(observer);
  }

 private:
  struct Bucket {
    std::vector<std::string> names;
    std::vector<torch::Tensor> params, views;
    int64_t elements = 0;
    torch::Tensor flat;
    std::vector<bool> ready;  // gradient complete for this step's communication
    size_t num_ready = 0;
    Pending pending;
    void launch(const Group& dp) {
      if (planted_bug("dp_average_twice")) flat.div_(dp.size);  // the "break it" exercise of chapter 1
      pending = all_reduce_async(dp, flat, /*average=*/true);
    }
    void wait_and_rearm() {  // the all-reduce done, the bucket counts afresh
      pending.wait();
      ready.assign(params.size(), false);
      num_ready = 0;
    }
  };
  struct State {
    Group dp;
    std::vector<Bucket> buckets;
    bool sync = true;
    std::function<void(size_t, bool)> observer;  // see observe_this_step
    Inspect inspect;                              // see inspect_before_all_reduce
    void launch(size_t b) {
      if (inspect) inspect(buckets[b].names, buckets[b].views);
      buckets[b].launch(dp);
      if (observer) observer(b, /*done=*/false);
    }
  };

  // Runs on the parameter's gradient accumulator. Before accumulating: an all-reduce still
  // in flight on this bucket (a backward without no_sync) finishes first, and the bucket
  // starts counting afresh. After: the gradient is made (again) a view of the bucket, and
  // when the bucket is complete its all-reduce starts.
  struct Hook : torch::autograd::FunctionPreHook, torch::autograd::FunctionPostHook {
    std::weak_ptr<State> state;
    size_t bucket, index;
    Hook(std::weak_ptr<State> s, size_t b, size_t i) : state(std::move(s)), bucket(b), index(i) {}
    torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
      if (auto s = state.lock())
        if (s->buckets[bucket].pending.work) s->buckets[bucket].wait_and_rearm();
      return grads;
    }
    torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                              const torch::autograd::variable_list& /*inputs*/) override {
      auto s = state.lock();
      if (!s) return outputs;  // the wrapper is gone: plain local gradients
      auto& bk = s->buckets[bucket];
      // [snippet: bucket_ready]
      adopt(bk, index, /*absent_is_zero=*/false);
      if (s->sync && !bk.ready[index]) {
        bk.ready[index] = true;
        if (++bk.num_ready == bk.params.size()) s->launch(bucket);
      }
      // [end snippet: bucket_ready]
      return outputs;
    }
  };

  // Makes parameter i's gradient the bucket's view again: a gradient that autograd allocated
  // afresh (after set-to-none) or that the caller replaced is copied in; none means zero.
  static void adopt(Bucket& bucket, size_t i, bool absent_is_zero) {
    torch::NoGradGuard no_grad;
    auto& p = bucket.params[i];
    auto& view = bucket.views[i];
    const auto& grad = p.grad();
    if (grad.defined() && grad.data_ptr() == view.data_ptr() && grad.sizes() == view.sizes()) return;
    if (grad.defined()) {
      require(grad.sizes() == view.sizes(), "BucketedDataParallel: the gradient of '{}' has shape {}, the parameter {}",
              bucket.names[i], c10::str(grad.sizes()), c10::str(view.sizes()));
      view.copy_(grad);
    } else if (absent_is_zero) {
      view.zero_();
    } else {
      return;
    }
    p.mutable_grad() = view;
  }

  static NamedParams numbered(const std::vector<torch::Tensor>& params) {
    NamedParams out;
    for (size_t i = 0; i < params.size(); ++i) out.emplace_back(fmt::format("parameter {}", i), params[i]);
    return out;
  }

  std::shared_ptr<State> state_;  // shared with the hooks (weakly) and with a live NoSync
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;
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
