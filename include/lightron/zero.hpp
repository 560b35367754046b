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
// ZeRO-3 (the weights sharded too) is zero3.hpp. Chapter 7.
#pragma once

#include "data_parallel.hpp"
#include "train.hpp"

namespace lightron {

// --data-parallel-sharding-strategy (Megatron-FSDP's names) -> the ZeRO stage, 0 for none.
inline int zero_stage(const std::string& strategy) {
  const std::vector<std::string> names{"no_shard", "optim", "optim_grads", "optim_grads_params"};
  const auto it = std::find(names.begin(), names.end(), strategy);
  require(it != names.end(), "--data-parallel-sharding-strategy must be no_shard, optim, optim_grads or "
          "optim_grads_params, got '{}'", strategy);
  return int(it - names.begin());
}

// Which parameters ZeRO buckets by unit rather than by size (plan_buckets). ZeRO-3 gathers
// weights a block at a time: unit i is block i ("h.<i>.*"), kRootUnit the rest (embeddings,
// final norm, head). ZeRO-1/2 give only a tied embedding shared by two pipeline stages a
// bucket of its own, so that its slices lie at the same places on both.
constexpr int64_t kRootUnit = int64_t(1) << 40;
inline std::map<std::string, int64_t> zero_units(const std::vector<std::string>& names, int stage, bool tied_shared) {
  std::map<std::string, int64_t> unit;
  for (const auto& name : names)
    if (stage == 3) unit[name] = name.rfind("h.", 0) == 0 ? std::stoll(name.substr(2)) : kRootUnit;
  if (stage < 3 && tied_shared) unit["wte.weight"] = 0;
  return unit;
}

class DistributedOptimizer {
 public:
  using NamedParams = BucketedDataParallel::NamedParams;

  // `params` this rank's, in the model's order; `units` from zero_units. Build the gradient
  // side with the same params and bucket size: BucketedDataParallel(params, dp,
  // bucket_elements, this->communication()). At stage 3 the weights' slices are copied
  // here; zero3.hpp then frees the whole weights.
  DistributedOptimizer(const NamedParams& params, const Group& dp, const TrainConfig& t, int stage,
                       int64_t bucket_elements, std::map<std::string, int64_t> units = {})
      : dp_(dp), stage_(stage), units_(std::move(units)), adam_({}, t), grads_(std::make_shared<Grads>()) {
    require(stage >= 1 && stage <= 3, "DistributedOptimizer: the ZeRO stage must be 1, 2 or 3, got {}", stage);
    torch::NoGradGuard no_grad;
    std::vector<int64_t> numels, unit;
    for (const auto& [name, p] : params) numels.push_back(p.numel()), unit.push_back(units_.count(name) ? units_[name] : -1);
    int64_t shard = 0;  // where the next bucket's slice starts in this rank's shard
    for (const auto& members : plan_buckets(numels, bucket_elements, unit)) {
      Bucket& b = buckets_.emplace_back();
      for (size_t k : members) b.elements += numels[k];
      b.unit = unit[members[0]];
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
    if (stage >= 2) grads_->shard = torch::zeros({shard}, options);
    if (stage == 3) weights_ = torch::zeros({shard}, options);
    for (auto& b : buckets_) {
      grads_->offsets.push_back(b.shard_offset);
      for (auto& s : b.segments) {
        s.master = stage == 3 ? weights_.narrow(0, s.in_shard, s.length) : s.param.detach().view(-1).narrow(0, s.start, s.length);
        if (stage == 3) s.master.copy_(s.param.detach().view(-1).narrow(0, s.start, s.length));
        adam_.slots.push_back({s.name, s.master, exp_avg_.narrow(0, s.in_shard, s.length),
                               exp_avg_sq_.narrow(0, s.in_shard, s.length), s.param.dim() >= 2, {}});
      }
    }
  }
  DistributedOptimizer(const DistributedOptimizer&) = delete;
  DistributedOptimizer& operator=(const DistributedOptimizer&) = delete;

  // How the gradient buckets communicate: a reduce-scatter; this rank's averaged slice goes
  // where an all-reduce would have put it (ZeRO-1) or is added to the gradient shard (ZeRO-2).
  BucketCommunication communication() const {
    BucketCommunication how;
    how.pad_to = dp_.size;
    how.release_after_launch = stage_ >= 2;
    how.unit = units_;
    // [snippet: zero_reduce_scatter]
    how.launch = [dp = dp_, stage = stage_, grads = grads_](size_t bucket, const torch::Tensor& flat) {
      if (stage == 1)
        return reduce_scatter_async(dp, flat, [dp, flat](torch::Tensor mine) {
          flat.view({dp.size, -1})[dp.rank].copy_(mine.div_(dp.size));  // the rest of flat is stale
        });
      auto pending = reduce_scatter_async(dp, flat, [dp, grads, bucket](torch::Tensor mine) {
        grads->shard.narrow(0, grads->offsets[bucket], mine.numel()).add_(mine.div_(dp.size));
      });
      if (grads->sent) grads->sent(bucket);  // ZeRO-3: the bucket's weights may go (zero3.hpp)
      return pending;
    };
    // [end snippet: zero_reduce_scatter]
    return how;
  }
  // ZeRO-3 (zero3.hpp): called when a bucket's gradients are sent, and after each update.
  void on_gradients_sent(std::function<void(size_t bucket)> f) { grads_->sent = std::move(f); }
  void on_weights_updated(std::function<void()> f) { updated_ = std::move(f); }

  void zero_grad() {
    torch::NoGradGuard no_grad;
    if (stage_ >= 2) grads_->shard.zero_();  // the full gradients were freed by backward
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
  torch::Tensor grad_sq_norm(const NamedParams& counted) {
    std::set<std::string> names;
    for (const auto& [name, p] : counted) names.insert(name);
    std::vector<torch::Tensor> grads;
    for (auto& b : buckets_)
      for (const auto& s : b.segments)
        if (names.count(s.name)) grads.push_back(gradient(s));
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
    if (stage_ == 3) return updated_ ? updated_() : void();  // the next forward gathers the new slices
    torch::NoGradGuard no_grad;
    for (auto& b : buckets_) {
      auto mine = torch::zeros({b.slice}, exp_avg_.options());  // padding stays zero
      for (const auto& s : b.segments) mine.narrow(0, s.in_shard - b.shard_offset, s.length).copy_(s.master);
      const auto whole = all_gather(dp_, mine, 0);
      for (size_t k = 0; k < b.params.size(); ++k)
        b.params[k].detach().view(-1).copy_(whole.narrow(0, b.offsets[k], b.params[k].numel()));
    }
  }
  // [end snippet: zero_step]

  // The whole AdamW state, as data parallelism holds it (for checkpoints: any layout loads
  // it). Collective over dp; a temporary of 8Ψ bytes. At stage 3, with the weights gathered
  // (zero3.hpp's WholeWeights).
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
  // The inverse: keep this rank's slices of a whole state (at stage 3, of its weights too).
  void load_consolidated(const AdamW& whole) {
    torch::NoGradGuard no_grad;
    adam_.step_count = whole.step_count;
    for (const auto& b : buckets_)
      for (const auto& s : b.segments) {
        const auto& slot = whole.slots.at(s.index);
        if (stage_ == 3) s.master.copy_(slot.param.detach().view(-1).narrow(0, s.start, s.length));
        exp_avg_.narrow(0, s.in_shard, s.length).copy_(slot.exp_avg.view(-1).narrow(0, s.start, s.length));
        exp_avg_sq_.narrow(0, s.in_shard, s.length).copy_(slot.exp_avg_sq.view(-1).narrow(0, s.start, s.length));
      }
  }

  int stage() const { return stage_; }
  size_t num_buckets() const { return buckets_.size(); }
  int64_t shard_elements() const { return exp_avg_.numel(); }  // Σ over buckets of padded/dp
  int64_t optimizer_bytes() const { return nbytes(exp_avg_) + nbytes(exp_avg_sq_); }
  int64_t gradient_shard_bytes() const { return grads_->shard.defined() ? nbytes(grads_->shard) : 0; }
  int64_t weight_shard_bytes() const { return weights_.defined() ? nbytes(weights_) : 0; }
  int64_t step_count() const { return adam_.step_count; }

  // ZeRO-3's gather units (zero3.hpp): a bucket's parameters, where each sits in the padded
  // bucket, and this rank's slice of its weights.
  struct WeightBucket {
    int64_t unit;
    std::vector<torch::Tensor> params;
    std::vector<int64_t> offsets;
    torch::Tensor slice;
  };
  std::vector<WeightBucket> weight_buckets() const {
    std::vector<WeightBucket> out;
    for (const auto& b : buckets_)
      out.push_back({b.unit, b.params, b.offsets, stage_ == 3 ? weights_.narrow(0, b.shard_offset, b.slice) : torch::Tensor()});
    return out;
  }

 private:
  struct Segment {  // the piece of one parameter inside this rank's slice of a bucket
    std::string name;
    size_t index;          // in the constructor's params
    torch::Tensor param;   // the parameter itself
    int64_t start;         // its first element in the piece
    int64_t in_shard;      // where the piece sits in this rank's shard
    int64_t length;
    torch::Tensor master;  // what AdamW updates: the piece of the weight, or at stage 3 of the shard
  };
  struct Bucket {
    int64_t unit = -1, elements = 0, slice = 0, shard_offset = 0;
    std::vector<torch::Tensor> params;
    std::vector<int64_t> offsets;         // of each parameter in the bucket
    std::vector<size_t> members;          // their indices in the constructor's params
    std::vector<Segment> segments;        // what this rank owns
  };
  struct Grads {  // shared with the communication's callbacks
    torch::Tensor shard;                  // ZeRO-2/3: this rank's averaged gradients
    std::vector<int64_t> offsets;         // of each bucket's slice in it
    std::function<void(size_t)> sent;     // on_gradients_sent
  };

  // A piece's averaged gradient: in the gradient bucket (ZeRO-1) or in the shard (ZeRO-2/3).
  torch::Tensor gradient(const Segment& s) const {
    if (stage_ >= 2) return grads_->shard.narrow(0, s.in_shard, s.length);
    return s.param.grad().view(-1).narrow(0, s.start, s.length);
  }

  Group dp_;
  int stage_;
  std::map<std::string, int64_t> units_;
  std::vector<Bucket> buckets_;
  torch::Tensor weights_;               // ZeRO-3: this rank's slices of the weights
  torch::Tensor exp_avg_, exp_avg_sq_;  // this rank's slices of the AdamW moments
  std::function<void()> updated_;       // on_weights_updated
  AdamW adam_;                          // over the pieces: views into the weights and the moments
  std::shared_ptr<Grads> grads_;
};

}  // namespace lightron
