// lightron/sharding.hpp — how one full tensor is cut into the pieces that tensor-parallel
// ranks hold, and put back together: a ShardSpec (the dimension, and the sizes of the fused
// blocks along it), shard() and unshard(). tensor_parallel.hpp's layers, checkpoints and the
// HuggingFace export all cut and join tensors this one way.
// Leaves out: uneven splits (every block must divide by the number of ranks).
// Introduced in tutorial chapter 2.
#pragma once

#include "core.hpp"

#include <vector>

namespace lightron {

// How a parameter splits across tp ranks: along `dim`, each of the consecutive `blocks`
// (sizes along dim) cut into tp equal parts; rank r holds part r of every block, in order.
// dim < 0: replicated.
struct ShardSpec {
  int64_t dim = -1;
  std::vector<int64_t> blocks;
};

// Rank r's shard of a full tensor.
// [snippet: shard]
inline torch::Tensor shard(const torch::Tensor& full, const ShardSpec& s, int64_t rank, int64_t size) {
  if (s.dim < 0) return full.clone();
  std::vector<torch::Tensor> parts;
  int64_t offset = 0;
  for (int64_t block : s.blocks) {
    parts.push_back(full.narrow(s.dim, offset + rank * (block / size), block / size));
    offset += block;
  }
  return torch::cat(parts, s.dim).contiguous();
}
// [end snippet: shard]

// The full tensor from every rank's shard (the inverse of shard()).
inline torch::Tensor unshard(const std::vector<torch::Tensor>& shards, const ShardSpec& s) {
  if (s.dim < 0) return shards.at(0);
  std::vector<torch::Tensor> parts;
  int64_t offset = 0;
  for (int64_t block : s.blocks) {
    const int64_t part = block / int64_t(shards.size());
    for (const auto& sh : shards) parts.push_back(sh.narrow(s.dim, offset, part));
    offset += part;
  }
  return torch::cat(parts, s.dim);
}

}  // namespace lightron
