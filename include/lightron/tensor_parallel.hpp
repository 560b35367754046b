// lightron/tensor_parallel.hpp — Megatron-LM's tensor parallelism (arXiv:1909.08053): each
// layer's weight matrices split across the tp group, with four conjugate mappings that
// make the forward and backward passes add up:
//     f = copy_to_tp_region:       identity forward,  all-reduce backward
//     g = reduce_from_tp_region:   all-reduce forward, identity backward
//     gather_from_tp_region / scatter_to_tp_region: along the last dimension
// and their sequence-parallel counterparts (arXiv:2205.05198) along the sequence dimension.
// Layers: ColumnParallelLinear and RowParallelLinear; the vocabulary's split (embedding and
// loss) is in vocab_parallel.hpp, and tp_model.hpp applies them all to an existing GPT.
// Introduced in chapter 2.
#pragma once

#include "collectives.hpp"
#include "gpt.hpp"
#include "sharding.hpp"  // ShardSpec: how a full tensor splits over ranks

#include <deque>
#include <map>
#include <mutex>

namespace lightron {

namespace tp_detail {
// Autograd contexts hold only IValues, so a graph names its group by a number: the index of
// a copy kept for the life of the process (a program has a handful of groups). A graph or a
// layer can then outlive the ProcessGroups it was built from without a dangling reference.
struct HeldGroups {
  std::mutex mutex;
  std::deque<Group> groups;  // a deque: elements never move as it grows
};
inline HeldGroups& held_groups() {
  static HeldGroups held;
  return held;
}
inline c10::IValue hold(const Group& g) {
  auto& held = held_groups();
  std::lock_guard<std::mutex> lock(held.mutex);
  for (size_t i = 0; i < held.groups.size(); ++i) {
    const Group& h = held.groups[i];
    if (h.pg == g.pg && h.name == g.name && h.ranks == g.ranks) return c10::IValue(int64_t(i));
  }
  held.groups.push_back(g);
  return c10::IValue(int64_t(held.groups.size() - 1));
}
inline const Group& group(torch::autograd::AutogradContext* ctx) {
  auto& held = held_groups();
  std::lock_guard<std::mutex> lock(held.mutex);
  return held.groups.at(size_t(ctx->saved_data["group"].toInt()));
}
inline torch::Tensor my_slice(const Group& g, const torch::Tensor& t, int64_t dim) {
  return t.chunk(g.size, dim)[g.rank].contiguous();
}
using Grads = torch::autograd::variable_list;
}  // namespace tp_detail

// f: identity forward, all-reduce of the gradient backward (before a column-parallel layer).
struct CopyToTensorParallelRegion : torch::autograd::Function<CopyToTensorParallelRegion> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const Group& g) {
    ctx->saved_data["group"] = tp_detail::hold(g);
    return x.view_as(x);
  }
  // [snippet: f_backward]
  static tp_detail::Grads backward(torch::autograd::AutogradContext* ctx, tp_detail::Grads grad) {
    auto dx = grad[0].clone();
    if (!planted_bug("tp_f_backward")) all_reduce(tp_detail::group(ctx), dx);  // (the "break it" of chapter 2)
    return {dx, torch::Tensor()};
  }
  // [end snippet: f_backward]
};

// g: all-reduce forward (after a row-parallel layer), identity backward.
struct ReduceFromTensorParallelRegion : torch::autograd::Function<ReduceFromTensorParallelRegion> {
  static torch::Tensor forward(torch::autograd::AutogradContext*, const torch::Tensor& x, const Group& g) {
    auto y = x.clone();
    all_reduce(g, y);
    return y;
  }
  static tp_detail::Grads backward(torch::autograd::AutogradContext*, tp_detail::Grads grad) { return {grad[0], torch::Tensor()}; }
};

// Concatenate the ranks' pieces along the last dimension; backward keeps this rank's piece.
struct GatherFromTensorParallelRegion : torch::autograd::Function<GatherFromTensorParallelRegion> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const Group& g) {
    ctx->saved_data["group"] = tp_detail::hold(g);
    return all_gather(g, x, x.dim() - 1);
  }
  static tp_detail::Grads backward(torch::autograd::AutogradContext* ctx, tp_detail::Grads grad) {
    return {tp_detail::my_slice(tp_detail::group(ctx), grad[0], grad[0].dim() - 1), torch::Tensor()};
  }
};

// Keep this rank's piece of the last dimension; backward gathers the gradient pieces.
struct ScatterToTensorParallelRegion : torch::autograd::Function<ScatterToTensorParallelRegion> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const Group& g) {
    ctx->saved_data["group"] = tp_detail::hold(g);
    return tp_detail::my_slice(g, x, x.dim() - 1);
  }
  static tp_detail::Grads backward(torch::autograd::AutogradContext* ctx, tp_detail::Grads grad) {
    return {all_gather(tp_detail::group(ctx), grad[0], grad[0].dim() - 1), torch::Tensor()};
  }
};

// Sequence parallel, activations (B, T/tp, C) between the tp blocks:
// all-gather along T forward, reduce-scatter of the gradient backward (replaces f) ...
struct GatherFromSequenceParallelRegion : torch::autograd::Function<GatherFromSequenceParallelRegion> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const Group& g) {
    ctx->saved_data["group"] = tp_detail::hold(g);
    return all_gather(g, x, /*dim=*/1);
  }
  static tp_detail::Grads backward(torch::autograd::AutogradContext* ctx, tp_detail::Grads grad) {
    return {reduce_scatter(tp_detail::group(ctx), grad[0], /*dim=*/1), torch::Tensor()};
  }
};

// ... and reduce-scatter along T forward, all-gather backward (replaces g).
struct ReduceScatterToSequenceParallelRegion : torch::autograd::Function<ReduceScatterToSequenceParallelRegion> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const Group& g) {
    ctx->saved_data["group"] = tp_detail::hold(g);
    return reduce_scatter(g, x, /*dim=*/1);
  }
  static tp_detail::Grads backward(torch::autograd::AutogradContext* ctx, tp_detail::Grads grad) {
    return {all_gather(tp_detail::group(ctx), grad[0], /*dim=*/1), torch::Tensor()};
  }
};

inline torch::Tensor copy_to_tp_region(const torch::Tensor& x, const Group& g) { return CopyToTensorParallelRegion::apply(x, g); }
inline torch::Tensor reduce_from_tp_region(const torch::Tensor& x, const Group& g) { return ReduceFromTensorParallelRegion::apply(x, g); }
inline torch::Tensor gather_from_tp_region(const torch::Tensor& x, const Group& g) { return GatherFromTensorParallelRegion::apply(x, g); }
inline torch::Tensor scatter_to_tp_region(const torch::Tensor& x, const Group& g) { return ScatterToTensorParallelRegion::apply(x, g); }
inline torch::Tensor gather_from_sp_region(const torch::Tensor& x, const Group& g) { return GatherFromSequenceParallelRegion::apply(x, g); }
inline torch::Tensor reduce_scatter_to_sp_region(const torch::Tensor& x, const Group& g) { return ReduceScatterToSequenceParallelRegion::apply(x, g); }

// A layer whose parameters are tensor-parallel shards says how each one splits ("weight",
// "bias" -> a ShardSpec of the full tensor): checkpoints, the gradient norm and unsharding
// read it from the module tree (tp_shard_specs), for lightron's GPT and for any other model.
struct TensorParallelLayer {
  virtual ~TensorParallelLayer() = default;
  virtual ShardSpec shard_spec(const std::string& parameter) const = 0;
};

// Y = XA + b with A split by columns, A = [A_1 … A_p]: rank i computes Y_i = X A_i + b_i.
// The input enters through f (or, with sequence parallel, an all-gather along T); the
// output stays split unless gather_output. A fused layer (e.g. [Q | K | V]) splits block by
// block: `blocks` are the full output sizes of its parts (default: one block). c_attn at
// tp = 2, blocks {H·D, G·D, G·D} (rows of our (out, in) weight = A's columns):
//     full    [ q0 q1 | k0 k1 | v0 v1 ]       q0: the query rows of heads 0..H/2-1, ...
//     rank 0  [ q0    | k0    | v0    ]       (H/2 + 2·G/2)·D rows: whole heads of each part
//     rank 1  [    q1 |    k1 |    v1 ]
// (cutting the rows in two halves instead would give rank 0 all of q and half of k).
struct ColumnParallelLinear : LinearLayer, TensorParallelLayer {
  torch::Tensor weight, bias;  // (out/p, in), (out/p)
  Group tp;  // held by value: a layer never refers to groups that may be gone
  bool sequence_parallel, gather_output;
  std::vector<int64_t> blocks;  // full sizes along out
  ColumnParallelLinear(torch::Tensor w, torch::Tensor b, const Group& g, bool sp, bool gather = false,
                       std::vector<int64_t> fused_blocks = {})
      : tp(g), sequence_parallel(sp), gather_output(gather), blocks(std::move(fused_blocks)) {
    if (blocks.empty()) blocks = {w.size(0) * g.size};
    weight = register_parameter("weight", w);
    if (b.defined()) bias = register_parameter("bias", b);
  }
  torch::Tensor forward(const torch::Tensor& x) override {  // (B, T, in) or, SP, (B, T/p, in)
    // [snippet: column_forward]
    auto input = sequence_parallel ? gather_from_sp_region(x, tp) : copy_to_tp_region(x, tp);  // (B, T, in)
    auto y = lightron::linear(input, weight, bias);  // (B, T, out/p)
    return gather_output ? gather_from_tp_region(y, tp) : y;  // (B, T, out) if gathered
    // [end snippet: column_forward]
  }
  ShardSpec shard_spec(const std::string&) const override { return {0, blocks}; }
};

// Y = XA + b with A split by rows, A = [A_1; …; A_p] and X = [X_1 … X_p] already split:
// Y = Σ_i X_i A_i through g (or a reduce-scatter along T), then b added once.
struct RowParallelLinear : LinearLayer, TensorParallelLayer {
  torch::Tensor weight, bias;  // (out, in/p), (out) replicated
  Group tp;
  bool sequence_parallel;
  RowParallelLinear(torch::Tensor w, torch::Tensor b, const Group& g, bool sp) : tp(g), sequence_parallel(sp) {
    weight = register_parameter("weight", w);
    if (b.defined()) bias = register_parameter("bias", b);
  }
  torch::Tensor forward(const torch::Tensor& x) override {  // (B, T, in/p)
    // [snippet: row_forward]
    auto partial = lightron::linear(x, weight);  // (B, T, out), this rank's term of the sum
    auto y = sequence_parallel ? reduce_scatter_to_sp_region(partial, tp) : reduce_from_tp_region(partial, tp);  // SP: (B, T/p, out)
    return bias.defined() ? y + bias : y;
    // [end snippet: row_forward]
  }
  ShardSpec shard_spec(const std::string& parameter) const override {
    return parameter == "weight" ? ShardSpec{1, {weight.size(1) * tp.size}} : ShardSpec{};
  }
};

// An existing full Linear cut into this tp rank's column-parallel part (rows of every block:
// blocks {H·D, G·D, G·D} for a fused [Q | K | V]), or row-parallel part (columns; the bias is
// replicated). The full layer is left as it was.
inline std::shared_ptr<ColumnParallelLinear> column_parallel_from(const Linear& full, const Group& tp,
                                                                  std::vector<int64_t> blocks = {},
                                                                  bool sequence_parallel = false,
                                                                  bool gather_output = false) {
  if (blocks.empty()) blocks = {full.weight.size(0)};
  int64_t total = 0;
  for (int64_t block : blocks) {
    require(block % tp.size == 0, "column_parallel_from: a block of {} rows does not split over {} tp ranks", block,
            tp.size);
    total += block;
  }
  require(total == full.weight.size(0), "column_parallel_from: the blocks add up to {} rows, the layer has {}", total,
          full.weight.size(0));
  torch::NoGradGuard no_grad;
  const ShardSpec spec{0, blocks};
  auto b = full.bias.defined() ? shard(full.bias, spec, tp.rank, tp.size) : torch::Tensor();
  return std::make_shared<ColumnParallelLinear>(shard(full.weight, spec, tp.rank, tp.size), b, tp, sequence_parallel,
                                                gather_output, blocks);
}
inline std::shared_ptr<RowParallelLinear> row_parallel_from(const Linear& full, const Group& tp,
                                                            bool sequence_parallel = false) {
  require(full.weight.size(1) % tp.size == 0, "row_parallel_from: {} input features do not split over {} tp ranks",
          full.weight.size(1), tp.size);
  torch::NoGradGuard no_grad;
  auto b = full.bias.defined() ? full.bias.clone() : torch::Tensor();
  return std::make_shared<RowParallelLinear>(shard(full.weight, ShardSpec{1, {full.weight.size(1)}}, tp.rank, tp.size),
                                             b, tp, sequence_parallel);
}

// Every parameter of `model` that a tensor-parallel layer holds, by its full name, with the
// way it splits (replicated ones of such layers have dim < 0; other parameters are absent).
inline std::map<std::string, ShardSpec> tp_shard_specs(const torch::nn::Module& model) {
  std::map<std::string, ShardSpec> out;
  for (const auto& item : model.named_modules()) {
    const auto* layer = dynamic_cast<const TensorParallelLayer*>(item.value().get());
    if (layer == nullptr) continue;
    for (const auto& p : item.value()->named_parameters(/*recurse=*/false))
      out[(item.key().empty() ? "" : item.key() + ".") + p.key()] = layer->shard_spec(p.key());
  }
  return out;
}

}  // namespace lightron
