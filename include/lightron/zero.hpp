// lightron/zero.hpp — ZeRO: shard the training state over the data-parallel group instead of
// copying it to every rank. Plain data parallelism keeps, per rank, 4Ψ bytes of fp32 weights,
// 4Ψ of gradients and 8Ψ of AdamW moments (Ψ parameters), the same on every dp rank.
// Here each dp rank owns a 1/dp slice of every gradient bucket (data_parallel.hpp's buckets,
// each padded to a multiple of dp) and keeps AdamW moments for its slices only:
//   * ZeRO-1, --data-parallel-sharding-strategy optim (= --use-distributed-optimizer): a
//     complete bucket is reduce-scattered instead of all-reduced (each rank receives the
//     average of its own slice), AdamW updates the weights of that slice, and an all-gather
//     hands every rank's updated slice to everybody. Memory 4Ψ + 4Ψ + 8Ψ/dp.
//   * ZeRO-2, optim_grads: as ZeRO-1, but a bucket's full gradients are freed as soon as
//     its reduce-scatter starts, during backward, after every micro-batch; each rank keeps
//     only the gradients of its slices. Memory 4Ψ + 12Ψ/dp.
// A ring all-reduce *is* a reduce-scatter followed by an all-gather: ZeRO-1 and -2 send the
// same bytes as data parallelism. Gradients that other groups must sum (sequence-parallel
// norms over tp, the tied embedding over the first and last pipeline stage) are summed on
// the slices, which lie at the same places on those ranks (the tied embedding has a bucket
// of its own for that). Checkpoints gather the whole AdamW state (consolidated()), so any
// layout can load them.
// Leaves out: ZeRO-3 (sharded weights, gathered per block). Chapter 6.
#pragma once

#include "data_parallel.hpp"
#include "train.hpp"

namespace lightron {

// --data-parallel-sharding-strategy (Megatron-FSDP's names) -> the ZeRO stage, 0 for none.
inline int zero_stage(const std::string& strategy) {
  if (strategy == "no_shard") return 0;
  if (strategy == "optim") return 1;
  if (strategy == "optim_grads") return 2;
  require(strategy != "optim_grads_params", "--data-parallel-sharding-strategy optim_grads_params (ZeRO-3) is not "
          "built yet: use no_shard, optim or optim_grads");
  throw UsageError(fmt::format("--data-parallel-sharding-strategy must be no_shard, optim or optim_grads, got '{}'",
                               strategy));
}

class DistributedOptimizer {
 public:
  using NamedParams = BucketedDataParallel::NamedParams;

  // `params` this rank's, in the model's order; `alone`: parameters given a bucket of their
  // own (the tied embedding on a pipeline's first and last stage). Build the gradient side
  // with the same params and bucket size: BucketedDataParallel(params, dp, bucket_elements,
  // this->communication()).
  DistributedOptimizer(const NamedParams& params, const Group& dp, const TrainConfig& t, int stage,
                       int64_t bucket_elements, std::set<std::string> alone = {})
      : dp_(dp), stage_(stage), alone_(std::move(alone)), adam_({}, t), grads_(std::make_shared<Grads>()) {
    require(stage == 1 || stage == 2, "DistributedOptimizer: the ZeRO stage must be 1 or 2, got {}", stage);
    torch::NoGradGuard no_grad;
    std::vector<int64_t> numels;
    std::vector<bool> by_itself;
    for (const auto& [name, p] : params) numels.push_back(p.numel()), by_itself.push_back(alone_.count(name) > 0);
    int64_t shard = 0;  // where the next bucket's slice starts in this rank's shard
    for (const auto& members : plan_buckets(numels, bucket_elements, by_itself)) {
      Bucket& b = buckets_.emplace_back();
      for (size_t k : members) b.elements += numels[k];
      b.slice = (b.elements + dp.size - 1) / dp.size;  // padded to a multiple of dp, as the gradient buckets
      b.shard_offset = shard;
      const int64_t lo = dp.rank * b.slice, hi = lo + b.slice;  // this rank's elements of the bucket
      int64_t offset = 0;
      for (size_t k : members) {
        const auto& [name, p] = params[k];
        b.params.push_back(p), b.offsets.push_back(offset), b.members.push_back(k);
        const int64_t start = std::max(lo, offset), end = std::min(hi, offset + p.numel());
        if (start < end)  // this rank owns elements [start, end) of the bucket: a piece of p
          b.segments.push_back({name, k, p, start - offset, shard + start - lo, end - start});
        offset += p.numel();
      }
      shard += b.slice;
    }
    const auto options = params.at(0).second.options();
    exp_avg_ = torch::zeros({shard}, options), exp_avg_sq_ = torch::zeros({shard}, options);
    if (stage == 2) grads_->shard = torch::zeros({shard}, options);
    for (auto& b : buckets_) {
      grads_->offsets.push_back(b.shard_offset);
      for (const auto& s : b.segments)
        adam_.slots.push_back({s.name, s.of_param(), exp_avg_.narrow(0, s.in_shard, s.length),
                               exp_avg_sq_.narrow(0, s.in_shard, s.length), s.param.dim() >= 2, {}});
    }
  }
  DistributedOptimizer(const DistributedOptimizer&) = delete;
  DistributedOptimizer& operator=(const DistributedOptimizer&) = delete;

  // How the gradient buckets communicate: a reduce-scatter; this rank's averaged slice goes
  // where an all-reduce would have put it (ZeRO-1) or is added to the gradient shard (ZeRO-2).
  BucketedDataParallel::Communication communication() const {
    BucketedDataParallel::Communication how;
    how.pad_to = dp_.size;
    how.release_after_launch = stage_ == 2;
    how.alone = alone_;
    // [snippet: zero_reduce_scatter]
    how.launch = [dp = dp_, stage = stage_, grads = grads_](size_t bucket, const torch::Tensor& flat) {
      if (stage == 1)
        return reduce_scatter_async(dp, flat, [dp, flat](torch::Tensor mine) {
          flat.view({dp.size, -1})[dp.rank].copy_(mine.div_(dp.size));  // the rest of flat is stale
        });
      return reduce_scatter_async(dp, flat, [dp, grads, bucket](torch::Tensor mine) {
        grads->shard.narrow(0, grads->offsets[bucket], mine.numel()).add_(mine.div_(dp.size));
      });
    };
    // [end snippet: zero_reduce_scatter]
    return how;
  }

  void zero_grad() {
    torch::NoGradGuard no_grad;
    if (stage_ == 2) grads_->shard.zero_();  // the full gradients were freed by backward
    for (auto& b : buckets_)
      for (auto& p : b.params)
        if (p.grad().defined()) p.mutable_grad().zero_();
  }

  // Adds the slices of `shared` (parameters replicated over `g`) across `g`.
  void sum_over(const Group& g, const std::vector<torch::Tensor>& shared) {
    for (auto& b : buckets_)
      for (const auto& s : b.segments)
        if (std::any_of(shared.begin(), shared.end(), [&](const torch::Tensor& t) { return t.is_same(s.param); }))
          all_reduce(g, gradient(s));
  }

  // Σ‖g‖² over this rank's slices of the `counted` parameters; summed over dp, it is theirs.
  torch::Tensor grad_sq_norm(const std::set<std::string>& counted) {
    std::vector<torch::Tensor> grads;
    for (auto& b : buckets_)
      for (const auto& s : b.segments)
        if (counted.count(s.name)) grads.push_back(gradient(s));
    return sq_norm(grads);
  }

  // [snippet: zero_step]
  // Clip, AdamW on this rank's slices, then every rank's updated slices to everybody.
  void step(double lr, const torch::Tensor& total_norm, double max_norm) {
    std::vector<torch::Tensor> grads;
    size_t i = 0;
    for (auto& b : buckets_)
      for (const auto& s : b.segments) grads.push_back(adam_.slots[i++].grad = gradient(s));
    clip_gradients(grads, total_norm, max_norm);
    adam_.step(lr);
    torch::NoGradGuard no_grad;
    for (auto& b : buckets_) {
      auto mine = torch::zeros({b.slice}, exp_avg_.options());  // padding stays zero
      for (const auto& s : b.segments) mine.narrow(0, s.in_shard - b.shard_offset, s.length).copy_(s.of_param());
      const auto whole = all_gather(dp_, mine, 0);
      for (size_t k = 0; k < b.params.size(); ++k)
        b.params[k].detach().view(-1).copy_(whole.narrow(0, b.offsets[k], b.params[k].numel()));
    }
  }
  // [end snippet: zero_step]

  // The whole AdamW state, as data parallelism holds it (for checkpoints: any layout loads
  // it). Collective over dp; a temporary of 8Ψ bytes.
  AdamW consolidated(const NamedParams& params, const TrainConfig& t) const {
    AdamW whole(params, t);
    whole.step_count = adam_.step_count;
    for (const auto& b : buckets_)
      for (const bool second : {false, true}) {
        const auto& moment = second ? exp_avg_sq_ : exp_avg_;
        const auto all = all_gather(dp_, moment.narrow(0, b.shard_offset, b.slice), 0);
        for (size_t k = 0; k < b.members.size(); ++k) {
          auto& slot = whole.slots.at(b.members[k]);
          (second ? slot.exp_avg_sq : slot.exp_avg).view(-1).copy_(all.narrow(0, b.offsets[k], b.params[k].numel()));
        }
      }
    return whole;
  }
  // The inverse: keep this rank's slices of a whole state.
  void load_consolidated(const AdamW& whole) {
    torch::NoGradGuard no_grad;
    adam_.step_count = whole.step_count;
    for (const auto& b : buckets_)
      for (const auto& s : b.segments) {
        const auto& slot = whole.slots.at(s.index);
        exp_avg_.narrow(0, s.in_shard, s.length).copy_(slot.exp_avg.view(-1).narrow(0, s.start, s.length));
        exp_avg_sq_.narrow(0, s.in_shard, s.length).copy_(slot.exp_avg_sq.view(-1).narrow(0, s.start, s.length));
      }
  }

  int stage() const { return stage_; }
  size_t num_buckets() const { return buckets_.size(); }
  int64_t shard_elements() const { return exp_avg_.numel(); }  // Σ over buckets of padded/dp
  int64_t optimizer_bytes() const { return nbytes(exp_avg_) + nbytes(exp_avg_sq_); }
  int64_t gradient_shard_bytes() const { return grads_->shard.defined() ? nbytes(grads_->shard) : 0; }
  int64_t step_count() const { return adam_.step_count; }

 private:
  struct Segment {  // the piece of one parameter inside this rank's slice of a bucket
    std::string name;
    size_t index;          // in the constructor's params
    torch::Tensor param;   // the parameter itself
    int64_t start;         // its first element in the piece
    int64_t in_shard;      // where the piece sits in this rank's shard
    int64_t length;
    torch::Tensor of_param() const { return param.detach().view(-1).narrow(0, start, length); }
  };
  struct Bucket {
    int64_t elements = 0, slice = 0, shard_offset = 0;
    std::vector<torch::Tensor> params;
    std::vector<int64_t> offsets;         // of each parameter in the bucket
    std::vector<size_t> members;          // their indices in the constructor's params
    std::vector<Segment> segments;        // what this rank owns
  };
  struct Grads {  // shared with the communication's callbacks
    torch::Tensor shard;                  // ZeRO-2: this rank's averaged gradients
    std::vector<int64_t> offsets;         // of each bucket's slice in it
  };

  // A piece's averaged gradient: in the gradient bucket (ZeRO-1) or in the shard (ZeRO-2).
  torch::Tensor gradient(const Segment& s) const {
    if (stage_ == 2) return grads_->shard.narrow(0, s.in_shard, s.length);
    return s.param.grad().view(-1).narrow(0, s.start, s.length);
  }

  Group dp_;
  int stage_;
  std::set<std::string> alone_;
  std::vector<Bucket> buckets_;
  torch::Tensor exp_avg_, exp_avg_sq_;  // this rank's slices of the AdamW moments
  AdamW adam_;                          // over the pieces: views into the weights and the moments
  std::shared_ptr<Grads> grads_;
};

}  // namespace lightron
