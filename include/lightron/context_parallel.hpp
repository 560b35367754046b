// lightron/context_parallel.hpp — chapter 8: context parallelism, applied to a model. Long
// sequences run out of activation memory before they run out of parameters; here the cp ranks
// of one model replica split every sequence, each keeping T/cp of its tokens' activations:
//   - the data: each cp rank takes its two chunks of every sample (head-tail split,
//     ring_attention.hpp), tokens and labels alike;
//   - positions: RoPE angles and learned position rows follow each token's global position;
//   - attention, the only layer where tokens meet, becomes ring attention over the cp group;
//     every other layer works per token and needs no change;
//   - gradients: each cp rank's loss is the mean over its own tokens, so the replicas' gradients
//     are averaged over dp × cp together (the trainer's dp_cp group), as Megatron does.
// Weights are not split: a checkpoint moves freely between cp layouts.
// Leaves out: all-to-all (Ulysses) context parallelism. Introduced in chapter 8.
#pragma once

#include "data.hpp"            // Batch
#include "recompute.hpp"       // RecomputeOptions
#include "ring_attention.hpp"

namespace lightron {

// Layout and model constraints, before anything is allocated.
inline void validate_context_parallel(const GPTConfig& c, int64_t cp, int64_t tp, bool sequence_parallel,
                                      const RecomputeOptions& recompute) {
  if (cp == 1) return;
  require(c.seq_length % (2 * cp) == 0, "--seq-length ({}) must be divisible by 2 x --context-parallel-size ({}): "
          "each cp rank holds 2 of the sequence's {} equal chunks", c.seq_length, cp, 2 * cp);
  require(!sequence_parallel || c.seq_length / cp % tp == 0, "--seq-length / --context-parallel-size ({} / {} = {}) "
          "must be divisible by --tensor-model-parallel-size ({}) with --sequence-parallel", c.seq_length, cp,
          c.seq_length / cp, tp);
  require(!recompute.selective(), "--recompute-granularity selective cannot be combined with --context-parallel-size "
          "{}: ring attention already keeps no attention probabilities (use full, or none)", cp);
}

// The global positions of rank `rank`'s T tokens: its two chunks' ranges, in order.
inline torch::Tensor positions_of(int64_t rank, const SequenceSplit& split, int64_t T, torch::Device device) {
  const int64_t c = T / 2;
  const auto chunks = split.chunks(rank);
  auto opts = torch::TensorOptions().dtype(torch::kLong).device(device);
  return torch::cat({torch::arange(chunks[0] * c, (chunks[0] + 1) * c, opts),
                     torch::arange(chunks[1] * c, (chunks[1] + 1) * c, opts)});
}

// This rank's columns of a (B, T_full) or (B, T_full, ...) tensor: (B, T_full / cp, ...).
// [snippet: context_chunks]
inline torch::Tensor sequence_chunks(const torch::Tensor& full, int64_t rank, const SequenceSplit& split) {
  const int64_t c = full.size(1) / (2 * split.size);
  const auto chunks = split.chunks(rank);
  return torch::cat({full.narrow(1, chunks[0] * c, c), full.narrow(1, chunks[1] * c, c)}, 1);
}
inline Batch context_chunks(const Batch& b, int64_t rank, const SequenceSplit& split) {
  return {sequence_chunks(b.tokens, rank, split), sequence_chunks(b.labels, rank, split)};
}
// [end snippet: context_chunks]

// Turns a (possibly tp-sharded, pp-cut) model into one that takes this cp rank's chunks: its
// attention cores become ring attention over `cp` and its positions the chunks' global ones.
// [snippet: apply_context_parallel]
inline void apply_context_parallel(GPT& model, const Group& cp, const SequenceSplit& split) {
  if (cp.size == 1) return;
  require(split.size == cp.size, "the sequence split is for {} ranks, the cp group has {}", split.size, cp.size);
  const auto ring = ring_detail::make_ring(cp, split);
  Positions here = [rank = cp.rank, split](int64_t T, torch::Device d) { return positions_of(rank, split, T, d); };
  if (planted_bug("cp_local_positions")) here = contiguous_positions;  // "break it", chapter 8
  model.positions = here;  // learned positions (wpe)
  for (auto& block : model.blocks) {
    if (!block) continue;  // another pipeline stage's
    block->attn->positions = here;  // RoPE
    block->attn->core = [ring](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
      return ring_attention(q, k, v, ring);
    };
  }
}
// [end snippet: apply_context_parallel]

// Every rank's attention work in a ring of `cp`, FLOPs of one forward and backward of one
// layer (B, H heads of size D, sequence T): the pairs ring attention computes, summed per rank.
inline std::vector<int64_t> attention_work(int64_t cp, const SequenceSplit& split, int64_t B, int64_t H, int64_t T,
                                           int64_t D) {
  const int64_t c = T / (2 * cp), per_pair = 7 * 2 * B * H * c * c * D;  // forward 2 products, backward 5
  std::vector<int64_t> work(cp, 0);
  for (int64_t r = 0; r < cp; ++r)
    for (int64_t source = 0; source < cp; ++source)
      for (int64_t qc : split.chunks(r))
        for (int64_t kc : split.chunks(source)) work[r] += kc <= qc ? per_pair : 0;
  return work;
}

}  // namespace lightron
