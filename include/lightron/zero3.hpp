// lightron/zero3.hpp — ZeRO-3 (--data-parallel-sharding-strategy optim_grads_params; the idea
// of PyTorch's FSDP): the weights are sharded over dp too. Each rank keeps only its slices of
// every bucket's weights (zero.hpp's DistributedOptimizer holds them and updates them), and a
// block's whole weights exist only while the block computes:
//   * forward: all-gather block i's weights just before it runs (the next block's gather is
//     already in flight: prefetched), free them right after;
//   * backward: when the gradient of block i's output arrives, gather its weights again (and
//     start block i-1's), and free them once all its gradients are reduce-scattered;
//   * the root (embeddings, final norm, head) is gathered when the model's forward starts and
//     freed when backward has produced its gradients (or at once without backward).
// Freeing keeps each parameter's tensor and empties its storage, as FSDP does: the tensors
// autograd saved (the weights, views of them) see the storage again when it is refilled.
// Memory: 16Ψ/dp (Ψ padded as the buckets are) plus the blocks gathered at the moment.
// Works with dp and tp; not with pp (the schedule would have to drive the gathers).
// Leaves out: mixed precision of the gathered weights, CPU offload. Chapter 7.
#pragma once

#include "gpt.hpp"
#include "zero.hpp"

#include <c10/core/StorageImpl.h>

namespace lightron {

class ShardedWeights {
 public:
  // Frees the whole weights of `model` (the optimizer holds their slices) and wraps the forward
  // of each block and of the model. Keep the returned pointer: the wrappers hold it weakly.
  static std::shared_ptr<ShardedWeights> apply(GPT& model, DistributedOptimizer& optimizer, const Group& dp) {
    auto w = std::shared_ptr<ShardedWeights>(new ShardedWeights(optimizer.weight_buckets(), dp));
    std::weak_ptr<ShardedWeights> weak = w;
    w->self_ = weak;
    for (size_t i = 0; i < model.blocks.size(); ++i)
      model.blocks[i]->wrappers.push_back([weak, i = int64_t(i)](const torch::Tensor& x, const Forward& inner) {
        auto self = weak.lock();
        return self ? self->run_block(i, x, inner) : inner(x);
      });
    model.wrappers.push_back([weak](const torch::Tensor& ids, const Forward& inner) {
      auto self = weak.lock();
      if (!self) return inner(ids);
      self->gather(kRootUnit), self->prefetch(0);
      auto logits = inner(ids);
      if (!logits.requires_grad()) self->release(kRootUnit);  // else when backward is done with it
      return logits;
    });
    optimizer.on_gradients_sent([weak](size_t bucket) {
      if (auto self = weak.lock()) self->free_bucket(self->buckets_[bucket]);
    });
    optimizer.on_weights_updated([weak] {
      if (auto self = weak.lock()) self->release_all();  // a gathered copy would be stale
    });
    w->release_all();
    return w;
  }

  // [snippet: zero3_block]
  torch::Tensor run_block(int64_t i, const torch::Tensor& x, const Forward& block) {
    gather(i);
    prefetch(i + 1);
    auto y = block(x);
    if (y.requires_grad()) {
      std::weak_ptr<ShardedWeights> weak = self_;
      y.register_hook([weak, i](const torch::Tensor& grad) {  // backward reaches block i
        if (auto self = weak.lock()) self->gather(i), self->prefetch(i - 1);
        return grad;
      });
    }
    release(i);  // saved tensors keep the parameters, not their memory
    return y;
  }
  // [end snippet: zero3_block]

  void gather_all() {
    for (auto& b : buckets_) gather_bucket(b);
  }
  void release_all() {
    for (auto& b : buckets_) free_bucket(b);
  }
  int64_t gathered_bytes() const {
    int64_t n = 0;
    for (const auto& b : buckets_)
      for (const auto& p : b.params) n += int64_t(p.storage().nbytes());
    return n;
  }

 private:
  struct Bucket : DistributedOptimizer::WeightBucket {
    bool gathered = true;  // the model starts whole
    Pending pending;       // a prefetch in flight
    torch::Tensor incoming;
  };

  ShardedWeights(std::vector<DistributedOptimizer::WeightBucket> buckets, const Group& dp) : dp_(dp) {
    for (auto& b : buckets) {
      for (const auto& p : b.params)
        require(p.is_contiguous() && p.storage_offset() == 0 && int64_t(p.storage().nbytes()) == nbytes(p),
                "ZeRO-3: a parameter shares its storage with another tensor; it cannot be freed on its own");
      Bucket mine;
      static_cast<DistributedOptimizer::WeightBucket&>(mine) = std::move(b);
      buckets_.push_back(std::move(mine));
    }
  }

  void gather(int64_t unit) {
    for (auto& b : buckets_)
      if (b.unit == unit) gather_bucket(b);
  }
  void release(int64_t unit) {
    for (auto& b : buckets_)
      if (b.unit == unit) free_bucket(b);
  }
  void prefetch(int64_t unit) {
    for (auto& b : buckets_)
      if (b.unit == unit && !b.gathered && !b.pending.work) start_gather(b);
  }

  // [snippet: zero3_gather]
  void start_gather(Bucket& b) {  // every rank's slice into one padded buffer, asynchronously
    b.incoming = torch::empty({b.slice.numel() * dp_.size}, b.slice.options());
    b.pending = all_gather_into_async(dp_, b.slice, b.incoming);
  }
  void gather_bucket(Bucket& b) {
    if (b.gathered) return;
    if (!b.pending.work) start_gather(b);
    b.pending.wait();
    torch::NoGradGuard no_grad;
    for (size_t k = 0; k < b.params.size(); ++k) {
      auto* storage = b.params[k].storage().unsafeGetStorageImpl();
      storage->set_data_ptr_noswap(storage->allocator()->allocate(nbytes(b.params[k])));
      storage->set_nbytes(nbytes(b.params[k]));
      // Written through a new alias: the parameter's version counter must not move, or
      // autograd would refuse the tensors it saved in forward.
      auto alias = torch::empty({0}, b.params[k].options());
      alias.set_(b.params[k].storage(), 0, {b.params[k].numel()}, {1});
      alias.copy_(b.incoming.narrow(0, b.offsets[k], b.params[k].numel()));
    }
    b.incoming = torch::Tensor();
    b.gathered = true;
  }
  void free_bucket(Bucket& b) {
    if (b.pending.work) b.pending.wait();  // a prefetch nobody used: finish it, drop it
    b.incoming = torch::Tensor();
    for (auto& p : b.params) {
      auto* storage = p.storage().unsafeGetStorageImpl();
      storage->set_data_ptr_noswap(at::DataPtr(nullptr, p.device()));
      storage->set_nbytes(0);
    }
    b.gathered = false;
  }
  // [end snippet: zero3_gather]

  Group dp_;
  std::vector<Bucket> buckets_;
  std::weak_ptr<ShardedWeights> self_;  // for the hooks
};

// While it lives, every weight is whole (for checkpoints, sampling, hashes, comparisons);
// a no-op without ZeRO-3.
class WholeWeights {
 public:
  explicit WholeWeights(std::shared_ptr<ShardedWeights> w) : w_(std::move(w)) {
    if (w_) w_->gather_all();
  }
  WholeWeights(const WholeWeights&) = delete;
  WholeWeights& operator=(const WholeWeights&) = delete;
  ~WholeWeights() {
    if (w_) w_->release_all();
  }

 private:
  std::shared_ptr<ShardedWeights> w_;
};

}  // namespace lightron
