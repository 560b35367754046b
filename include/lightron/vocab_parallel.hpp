// lightron/vocab_parallel.hpp — tensor parallelism over the vocabulary (Megatron-LM): the
// token embedding and the output layer hold V/tp rows each, and the cross-entropy is computed
// from the split logits with three small all-reduces, so the (B, T, V) logits never exist on
// one rank. Uses the mappings of tensor_parallel.hpp. Introduced in chapter 2.
#pragma once

#include "tensor_parallel.hpp"

namespace lightron {

// Rows [start, start + V/p) of the embedding on each rank; ids outside the range give zero
// vectors, and the ranks' vectors are added up: by g (all-reduce) into (B, T, C) on every
// rank, or, with sequence parallel, by a reduce-scatter along T into this rank's (B, T/p, C)
// (Megatron's reduce_scatter_embeddings: half the bytes of the all-reduce on the wire; its
// backward all-gathers the gradient).
struct VocabParallelEmbedding : Embedding, TensorParallelLayer {
  Group tp;
  int64_t vocab_start;
  bool sequence_parallel;
  VocabParallelEmbedding(torch::Tensor w, const Group& g, bool sp = false)
      : tp(g), vocab_start(w.size(0) * g.rank), sequence_parallel(sp) {
    weight = register_parameter("weight", w);
  }
  torch::Tensor forward(const torch::Tensor& ids) override {  // (B, T)
    // [snippet: vocab_embedding_forward]
    auto outside = (ids < vocab_start) | (ids >= vocab_start + weight.size(0));
    auto local = (ids - vocab_start).masked_fill(outside, 0);
    auto vectors = torch::embedding(weight, local).masked_fill(outside.unsqueeze(-1), 0.0);  // (B, T, C), partial
    return sequence_parallel ? reduce_scatter_to_sp_region(vectors, tp)  // (B, T/p, C)
                             : reduce_from_tp_region(vectors, tp);       // (B, T, C)
    // [end snippet: vocab_embedding_forward]
  }
  ShardSpec shard_spec(const std::string&) const override { return {0, {weight.size(0) * tp.size}}; }
};

// Cross-entropy over logits split by vocabulary (B, T, V/p), per token:
//   loss = log Σ_v exp(z_v - m) - (z_y - m), with m = max_v z_v,
// where the max, the sum of exponentials and the target logit z_y are each reduced across
// the group; backward: softmax - onehot(y), on this rank's columns only. At tp = 2:
//     logits (B, T, V), by vocabulary:  [ 0 … V/2-1      | V/2 … V-1      ]
//                                         rank 0 (B,T,V/2)   rank 1 (B,T,V/2)
//     1. m = max over my columns                    -> all-reduce MAX (B, T, 1)
//     2. z_y - m if y is one of my columns, else 0  -> all-reduce SUM (B, T): the owner's value
//     3. Σ exp(z - m) over my columns               -> all-reduce SUM (B, T)
//     loss = log(3) - (2) on every rank; the (B, T, V) logits are never gathered.
struct VocabParallelCrossEntropy : torch::autograd::Function<VocabParallelCrossEntropy> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& logits,
                               const torch::Tensor& labels, const Group& g) {
    auto z = logits.to(torch::kFloat);  // (B, T, V/p)
    const int64_t part = z.size(-1), start = part * g.rank;
    // [snippet: vocab_cross_entropy_forward]
    auto m = std::get<0>(z.max(-1, /*keepdim=*/true));  // (B, T, 1)
    all_reduce_max(g, m);
    z = z - m;
    auto outside = (labels < start) | (labels >= start + part);
    auto local = (labels - start).masked_fill(outside, 0);
    auto target = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0);  // (B, T)
    all_reduce(g, target);
    auto exp = z.exp();
    auto sum_exp = exp.sum(-1);
    all_reduce(g, sum_exp);
    // [end snippet: vocab_cross_entropy_forward]
    ctx->save_for_backward({exp / sum_exp.unsqueeze(-1), local, outside});
    return sum_exp.log() - target;  // (B, T)
  }
  static tp_detail::Grads backward(torch::autograd::AutogradContext* ctx, tp_detail::Grads grad) {
    auto saved = ctx->get_saved_variables();
    auto dz = saved[0].clone();  // softmax
    auto inside = (~saved[2]).to(dz.scalar_type());
    dz.scatter_add_(-1, saved[1].unsqueeze(-1), -inside.unsqueeze(-1));
    return {dz * grad[0].unsqueeze(-1), torch::Tensor(), torch::Tensor()};
  }
};

inline torch::Tensor vocab_parallel_cross_entropy(const torch::Tensor& logits, const torch::Tensor& labels, const Group& g) {
  return VocabParallelCrossEntropy::apply(logits, labels, g).mean();
}

}  // namespace lightron
