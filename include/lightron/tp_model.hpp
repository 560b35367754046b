// lightron/tp_model.hpp — apply_tensor_parallel: shard an existing, fully initialised GPT
// in place, so that tp ranks start from exactly the single-device weights.
//   attention: whole heads per rank; the fused [Q | K | V] rows split block by block
//              (with grouped-query attention, the key/value groups split the same way);
//              c_attn column-parallel, c_proj row-parallel.
//   MLP:       c_fc column-parallel ([gate | up] split block by block for SwiGLU),
//              c_proj row-parallel.
//   wte / lm_head: vocab-parallel; the loss becomes the vocab-parallel cross-entropy.
//   norms, row-parallel biases, wpe: replicated (identical on every tp rank).
// Sequence parallel: the embedding reduce-scatters along T (each rank keeps the sum for its
// T/tp tokens), wpe adds the rows of those positions only, and the blocks run on (B, T/tp, C).
// One table, tp_shard_spec, says how each parameter splits; shard() and unshard() read it,
// and so do the parity tests and checkpoints. Introduced in chapter 2.
#pragma once

#include "process_groups.hpp"
#include "tensor_parallel.hpp"
#include "vocab_parallel.hpp"  // VocabParallelEmbedding, vocab_parallel_cross_entropy

#include <set>

namespace lightron {

inline ShardSpec tp_shard_spec(const std::string& name, const GPTConfig& c) {
  const int64_t D = c.head_dim(), F = c.ffn();
  // [snippet: c_attn_spec]
  if (name_ends_with(name, "attn.c_attn.weight") || name_ends_with(name, "attn.c_attn.bias"))
    return {0, {c.num_attention_heads * D, c.query_groups() * D, c.query_groups() * D}};
  // [end snippet: c_attn_spec]
  if (name_ends_with(name, "mlp.c_fc.weight") || name_ends_with(name, "mlp.c_fc.bias"))
    return {0, c.swiglu ? std::vector<int64_t>{F, F} : std::vector<int64_t>{F}};
  if (name_ends_with(name, "attn.c_proj.weight")) return {1, {c.hidden_size}};
  if (name_ends_with(name, "mlp.c_proj.weight")) return {1, {F}};
  if (name == "wte.weight" || name == "lm_head.weight") return {0, {c.vocab_size}};
  return {};
}

// Model-shape constraints of a tensor-parallel layout, before anything is allocated.
inline void validate_tensor_parallel(const GPTConfig& c, int64_t tp, bool sequence_parallel) {
  require(c.num_attention_heads % tp == 0, "--num-attention-heads ({}) must be divisible by "
          "--tensor-model-parallel-size ({})", c.num_attention_heads, tp);
  require(c.query_groups() % tp == 0, "--num-query-groups ({}) must be divisible by --tensor-model-parallel-size ({})",
          c.query_groups(), tp);
  require(c.ffn() % tp == 0, "--ffn-hidden-size ({}) must be divisible by --tensor-model-parallel-size ({})", c.ffn(), tp);
  require(c.vocab_size % tp == 0, "the padded vocabulary ({}) must be divisible by --tensor-model-parallel-size ({})",
          c.vocab_size, tp);
  require(!sequence_parallel || c.seq_length % tp == 0,
          "--seq-length ({}) must be divisible by --tensor-model-parallel-size ({}) with --sequence-parallel",
          c.seq_length, tp);
}

// Learned positions under sequence parallel: each rank adds the rows of its part of T to the
// embedding's reduce-scatter output, after the sum over tp (added before it, wpe would count
// tp times). The table is replicated and rank r's gradient holds only rows [r·T/tp, (r+1)·T/tp),
// so the sum over tp that the trainer makes (sequence_parallel_params) is the full gradient.
struct SequenceShardedPositions : Embedding {
  Group tp;
  SequenceShardedPositions(torch::Tensor w, const Group& g) : tp(g) { weight = register_parameter("weight", w); }
  torch::Tensor forward(const torch::Tensor& positions) override {  // (T) -> (T/tp, C)
    // [snippet: sharded_positions_forward]
    const int64_t part = positions.size(0) / tp.size;
    return torch::embedding(weight, positions.narrow(0, part * tp.rank, part));
    // [end snippet: sharded_positions_forward]
  }
};

// The output layer under tp: f (or the sequence all-gather), then this rank's vocabulary
// rows, which are wte's own shard when the embeddings are tied.
struct VocabParallelHead : LinearLayer, TensorParallelLayer {
  std::shared_ptr<Embedding> tied;  // wte when tied, else null
  torch::Tensor weight;             // (V/p, C) when untied
  Group tp;
  bool sequence_parallel;
  VocabParallelHead(std::shared_ptr<Embedding> wte, torch::Tensor w, const Group& g, bool sp)
      : tied(std::move(wte)), tp(g), sequence_parallel(sp) {
    if (!tied) weight = register_parameter("weight", w);
  }
  torch::Tensor forward(const torch::Tensor& x) override {  // (B, T, C) or, SP, (B, T/p, C)
    auto input = sequence_parallel ? gather_from_sp_region(x, tp) : copy_to_tp_region(x, tp);  // (B, T, C)
    return lightron::linear(input, tied ? tied->weight : weight);  // (B, T, V/p)
  }
  ShardSpec shard_spec(const std::string&) const override { return {0, {weight.size(0) * tp.size}}; }
};

// What sharding changed, for the training step: which parameters are split (their squared
// norms add across tp) and which replicated ones need their gradients summed (sequence parallel).
struct TensorParallelInfo {
  std::set<std::string> sharded;
  std::vector<torch::Tensor> sequence_parallel_params;
};

inline TensorParallelInfo apply_tensor_parallel(GPT& model, const Group& tp, bool sequence_parallel) {
  const GPTConfig& c = model.config;
  validate_tensor_parallel(c, tp.size, sequence_parallel);
  TensorParallelInfo info;
  if (tp.size == 1) return info;
  torch::NoGradGuard no_grad;
  auto part = [&](const std::string& name, const torch::Tensor& full) { return shard(full, tp_shard_spec(name, c), tp.rank, tp.size); };
  auto linear = [](const std::shared_ptr<LinearLayer>& l) { return std::dynamic_pointer_cast<Linear>(l); };
  for (size_t i = 0; i < model.blocks.size(); ++i) {
    auto& block = *model.blocks[i];
    const std::string prefix = "h." + std::to_string(i) + ".";
    // parent.slot (e.g. attn.c_attn) becomes a column- or row-parallel layer.
    auto column = [&](torch::nn::Module& parent, std::shared_ptr<LinearLayer>& slot, const std::string& parent_name,
                      const std::string& name) {
      const auto blocks = tp_shard_spec(prefix + parent_name + "." + name + ".weight", c).blocks;
      slot = parent.replace_module(name, column_parallel_from(*linear(slot), tp, blocks, sequence_parallel));
    };
    auto row = [&](torch::nn::Module& parent, std::shared_ptr<LinearLayer>& slot, const std::string& name) {
      slot = parent.replace_module(name, row_parallel_from(*linear(slot), tp, sequence_parallel));
    };
    column(*block.attn, block.attn->c_attn, "attn", "c_attn");
    row(*block.attn, block.attn->c_proj, "c_proj");
    column(*block.mlp, block.mlp->c_fc, "mlp", "c_fc");
    row(*block.mlp, block.mlp->c_proj, "c_proj");
    // [snippet: fewer_heads]
    block.attn->num_heads /= tp.size;
    block.attn->num_groups /= tp.size;
    // [end snippet: fewer_heads]
  }
  model.wte = model.replace_module(  // with SP: a reduce-scatter to (B, T/tp, C), not an all-reduce
      "wte", std::make_shared<VocabParallelEmbedding>(part("wte.weight", model.wte->weight), tp, sequence_parallel));
  if (model.wpe && sequence_parallel)
    model.wpe = model.replace_module("wpe", std::make_shared<SequenceShardedPositions>(model.wpe->weight.clone(), tp));
  if (c.tied()) {
    model.lm_head = std::make_shared<VocabParallelHead>(model.wte, torch::Tensor(), tp, sequence_parallel);
  } else {
    auto full = linear(model.lm_head);
    model.lm_head = model.replace_module(
        "lm_head", std::make_shared<VocabParallelHead>(nullptr, part("lm_head.weight", full->weight), tp, sequence_parallel));
  }
  for (const auto& [name, spec] : tp_shard_specs(model))  // what the new layers hold as shards
    if (spec.dim >= 0) info.sharded.insert(name);
  model.loss_fn = [tp](const torch::Tensor& logits, const torch::Tensor& labels) {
    return vocab_parallel_cross_entropy(logits, labels, tp);
  };
  if (sequence_parallel) {  // (the embedding already returns this rank's T/tp)
    for (auto& p : model.named_parameters())  // replicated, but each rank saw only its part of T
      if (!info.sharded.count(p.key())) info.sequence_parallel_params.push_back(p.value());
  }
  return info;
}

}  // namespace lightron
