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
// check_replicas (parity.hpp) hashes the parameters and names a replica that diverged.
// ZeRO (zero.hpp) reuses the buckets, communicating them its own way (BucketCommunication).
// Chapter 1.
#pragma once

#include "process_groups.hpp"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>


namespace lightron {

// Which parameters share a bucket: filled from the last parameter backwards (the order in
// which backward produces their gradients), at most `bucket_elements` each (a bigger parameter
// alone). Parameters with a `unit` >= 0 share a bucket with exactly their unit's neighbours,
// whatever its size (ZeRO: the tied embedding alone; ZeRO-3: a block). Indices into
// `numels`, by bucket. The planner (memory.hpp) calls it too, for ZeRO's padding.
inline std::vector<std::vector<size_t>> plan_buckets(const std::vector<int64_t>& numels, int64_t bucket_elements,
                                                     const std::vector<int64_t>& unit = {}) {
  std::vector<std::vector<size_t>> buckets;
  int64_t elements = 0, previous = -2;
  for (size_t k = numels.size(); k-- > 0;) {
    const int64_t u = k < unit.size() ? unit[k] : -1;
    if (buckets.empty() || u != previous || (u < 0 && elements + numels[k] > bucket_elements))
      buckets.emplace_back(), elements = 0;
    buckets.back().push_back(k);
    elements += numels[k];
    previous = u;
  }
  return buckets;
}

// How a complete bucket is communicated. The default is data parallelism's all-reduce;
// ZeRO (zero.hpp) reduce-scatters instead, and under ZeRO-2 frees the full gradients.
struct BucketCommunication {
  std::function<Pending(size_t bucket, const torch::Tensor& flat)> launch;  // none: all-reduce, average
  int64_t pad_to = 1;                 // each bucket's length is rounded up to a multiple of this
  bool release_after_launch = false;  // the bucket is freed once sent; no_sync() does nothing
  std::map<std::string, int64_t> unit;  // parameters bucketed by unit (plan_buckets); others by size
};

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

  // `params` in the model's order (plan_buckets). The group is copied.
  BucketedDataParallel(const NamedParams& params, const Group& dp, int64_t bucket_elements, BucketCommunication how = {})
      : state_(std::make_shared<State>()) {
    require(bucket_elements > 0, "--ddp-bucket-size must be positive, got {}", bucket_elements);
    state_->dp = dp;
    state_->how = std::move(how);
    std::vector<int64_t> numels, unit;
    for (const auto& [name, p] : params) {
      require(p.is_leaf() && p.requires_grad(), "BucketedDataParallel: parameter '{}' is not a leaf tensor that "
              "requires grad", name);
      numels.push_back(p.numel());
      const auto it = state_->how.unit.find(name);
      unit.push_back(it == state_->how.unit.end() ? -1 : it->second);
    }
    auto& buckets = state_->buckets;
    std::weak_ptr<State> weak = state_;
    for (const auto& members : plan_buckets(numels, bucket_elements, unit)) {
      auto& bucket = buckets.emplace_back();
      for (size_t k : members) {
        bucket.names.push_back(params[k].first);
        bucket.params.push_back(params[k].second);
        bucket.elements += params[k].second.numel();
      }
      const int64_t pad = state_->how.pad_to;
      bucket.padded = (bucket.elements + pad - 1) / pad * pad;
      bucket.ready.assign(bucket.params.size(), false);
      if (!state_->how.release_after_launch) bucket.allocate();  // else at the first gradient
      for (size_t i = 0; i < bucket.params.size(); ++i) {
        auto& p = bucket.params[i];
        if (bucket.flat.defined()) p.mutable_grad() = bucket.views[i];  // autograd accumulates into it in place
        auto accumulator = torch::autograd::impl::grad_accumulator(p);
        accumulator->add_pre_hook(std::make_unique<Hook>(weak, buckets.size() - 1, i));
        accumulator->add_post_hook(std::make_unique<Hook>(weak, buckets.size() - 1, i));
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
  NoSync no_sync() { return state_->how.release_after_launch ? NoSync() : NoSync(state_); }

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
    int64_t elements = 0, padded = 0;  // padded: the flat's length (BucketCommunication::pad_to)
    torch::Tensor flat;                // none while released (ZeRO-2)
    std::vector<bool> ready;  // gradient complete for this step's communication
    size_t num_ready = 0;
    Pending pending;
    void allocate() {  // the flat and each parameter's view of it
      flat = torch::zeros({padded}, params[0].options());
      views.clear();
      int64_t offset = 0;
      for (const auto& p : params) {
        views.push_back(flat.narrow(0, offset, p.numel()).view_as(p));
        offset += p.numel();
      }
    }
    void release() {  // the gradients are gone: the next ones allocate afresh
      for (auto& p : params) p.mutable_grad() = torch::Tensor();
      views.clear();
      flat = torch::Tensor();
    }
    void wait_and_rearm() {  // the communication done, the bucket counts afresh
      pending.wait();
      ready.assign(params.size(), false);
      num_ready = 0;
    }
  };
  struct State {
    Group dp;
    BucketCommunication how;
    std::vector<Bucket> buckets;
    bool sync = true;
    std::function<void(size_t, bool)> observer;  // see observe_this_step
    Inspect inspect;                              // see inspect_before_all_reduce
    void launch(size_t b) {
      auto& bucket = buckets[b];
      if (inspect) inspect(bucket.names, bucket.views);
      if (how.launch) {
        bucket.pending = how.launch(b, bucket.flat);
      } else {
        if (planted_bug("dp_average_twice")) bucket.flat.div_(dp.size);  // the "break it" exercise of chapter 1
        bucket.pending = all_reduce_async(dp, bucket.flat, /*average=*/true);
      }
      if (how.release_after_launch) bucket.release();
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
    const auto grad = p.grad();
    if (!grad.defined() && !absent_is_zero) return;
    if (!bucket.flat.defined()) bucket.allocate();  // released (ZeRO-2): a fresh, zeroed bucket
    auto& view = bucket.views[i];
    if (grad.defined() && grad.data_ptr() == view.data_ptr() && grad.sizes() == view.sizes()) return;
    if (grad.defined()) {
      require(grad.sizes() == view.sizes(), "BucketedDataParallel: the gradient of '{}' has shape {}, the parameter {}",
              bucket.names[i], c10::str(grad.sizes()), c10::str(view.sizes()));
      view.copy_(grad);
    } else {
      view.zero_();
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

}  // namespace lightron
