// lightron/gpt_config.hpp — a GPT's settings: GPTConfig (Megatron-LM's flag names, the two
// flavours' presets), the padded vocabulary, the course's model, and the checks that run
// before a model is built (validate_model_config: divisibility, and bounds past which a
// model cannot fit or can only train to NaN). The model itself is gpt.hpp.
// Leaves out: the model. Introduced in chapter 0.
#pragma once

#include "core.hpp"

#include <cmath>  // isfinite
#include <string>
#include <utility>

namespace lightron {

struct GPTConfig {
  int64_t num_layers = 4;               // L
  int64_t hidden_size = 256;            // C
  int64_t ffn_hidden_size = 0;          // F; 0 means 4·C
  int64_t num_attention_heads = 4;      // H
  int64_t num_query_groups = 0;         // G key/value heads; 0 means H (no grouping)
  int64_t seq_length = 128;             // T
  int64_t max_position_embeddings = 0;  // 0 means seq_length
  int64_t vocab_size = 4096;            // V, already padded (see padded_vocab_size)
  std::string normalization = "LayerNorm";                  // or RMSNorm
  std::string position_embedding_type = "learned_absolute";  // or rope
  bool swiglu = false;
  bool untie_embeddings_and_output_weights = false;
  bool add_bias_linear = true;
  double init_method_std = 0.02;
  double rotary_base = 10000.0;
  double norm_epsilon = 1e-5;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }              // D
  int64_t ffn() const { return ffn_hidden_size > 0 ? ffn_hidden_size : 4 * hidden_size; }
  int64_t query_groups() const { return num_query_groups > 0 ? num_query_groups : num_attention_heads; }
  int64_t max_positions() const { return max_position_embeddings > 0 ? max_position_embeddings : seq_length; }
  bool rope() const { return position_embedding_type == "rope"; }
  bool rms_norm() const { return normalization == "RMSNorm"; }
  bool tied() const { return !untie_embeddings_and_output_weights; }
  int64_t qkv_size() const { return (num_attention_heads + 2 * query_groups()) * head_dim(); }

  // The two flavours, for tests and examples; flags override fields one by one.
  static GPTConfig gpt2() { return GPTConfig{}; }
  static GPTConfig llama() {
    GPTConfig c;
    c.normalization = "RMSNorm";
    c.position_embedding_type = "rope";
    c.swiglu = true;
    c.untie_embeddings_and_output_weights = true;
    c.add_bias_linear = false;
    return c;
  }
};

// Megatron pads the vocabulary so that it splits evenly over tensor-parallel ranks.
inline int64_t padded_vocab_size(int64_t vocab, int64_t divisible_by, int64_t tp_size) {
  const int64_t multiple = divisible_by * tp_size;
  return (vocab + multiple - 1) / multiple * multiple;
}

// The course's small GPT-2 (the examples of chapters 0-4): L 4, C 128, H 4, T 64, and V the
// tokenizer's pieces padded to a multiple of 128 · tp. Small enough for a laptop CPU.
inline GPTConfig course_gpt_config(int64_t tokenizer_pieces, int64_t tp_size = 1) {
  GPTConfig c = GPTConfig::gpt2();
  c.num_layers = 4;           // L
  c.hidden_size = 128;        // C
  c.num_attention_heads = 4;  // H
  c.seq_length = 64;          // T
  c.vocab_size = padded_vocab_size(tokenizer_pieces, /*divisible_by=*/128, tp_size);  // V
  return c;
}

// Checks the model's shape before anything is allocated; one line naming flag and values.
inline void validate_model_config(const GPTConfig& c) {
  const std::pair<const char*, int64_t> positive[] = {
      {"num-layers", c.num_layers}, {"hidden-size", c.hidden_size},
      {"num-attention-heads", c.num_attention_heads}, {"seq-length", c.seq_length},
      {"vocab-size", c.vocab_size}};
  for (const auto& [flag, value] : positive) require(value > 0, "--{} must be positive, got {}", flag, value);
  const std::pair<const char*, int64_t> defaulted[] = {  // 0 picks the default
      {"ffn-hidden-size", c.ffn_hidden_size}, {"num-query-groups", c.num_query_groups},
      {"max-position-embeddings", c.max_position_embeddings}};
  for (const auto& [flag, value] : defaulted)
    require(value >= 0, "--{} must not be negative (0 picks the default), got {}", flag, value);
  require(c.hidden_size % c.num_attention_heads == 0, "--hidden-size ({}) must be divisible by --num-attention-heads ({})",
          c.hidden_size, c.num_attention_heads);
  require(c.num_attention_heads % c.query_groups() == 0,
          "--num-attention-heads ({}) must be divisible by --num-query-groups ({})", c.num_attention_heads, c.query_groups());
  require(c.seq_length <= c.max_positions(), "--seq-length ({}) must not exceed --max-position-embeddings ({})",
          c.seq_length, c.max_positions());
  require(c.normalization == "LayerNorm" || c.normalization == "RMSNorm",
          "--normalization must be LayerNorm or RMSNorm, got '{}'", c.normalization);
  require(c.position_embedding_type == "learned_absolute" || c.position_embedding_type == "rope",
          "--position-embedding-type must be learned_absolute or rope, got '{}'",
          c.position_embedding_type);
  require(!c.rope() || c.head_dim() % 2 == 0, "rope needs an even head size, got {} ({} / {})",
          c.head_dim(), c.hidden_size, c.num_attention_heads);
  require(c.init_method_std > 0, "--init-method-std must be positive, got {}", c.init_method_std);
  // Upper bounds: no machine holds a model past the sizes' (a 2^24 x 2^24 matrix alone is 1 PiB
  // in fp32), and they keep the planner's counts inside int64; past the floats' bounds (or at
  // NaN/inf) training can only give NaN.
  constexpr int64_t kMaxSize = int64_t(1) << 24, kMaxLayers = 4096;
  require(c.num_layers <= kMaxLayers, "--num-layers must be at most {}, got {}", kMaxLayers, c.num_layers);
  const std::pair<const char*, int64_t> sizes[] = {
      {"hidden-size", c.hidden_size}, {"ffn-hidden-size", c.ffn_hidden_size}, {"num-attention-heads", c.num_attention_heads},
      {"num-query-groups", c.num_query_groups}, {"seq-length", c.seq_length},
      {"max-position-embeddings", c.max_position_embeddings}, {"vocab-size (padded)", c.vocab_size}};
  for (const auto& [flag, value] : sizes)
    require(value <= kMaxSize, "--{} must be at most {} (2^24), got {}", flag, kMaxSize, value);
  require(std::isfinite(c.init_method_std) && c.init_method_std <= 1,
          "--init-method-std must be in (0, 1] (GPT-2 uses 0.02; larger weights overflow the logits), got {}",
          c.init_method_std);
  require(std::isfinite(c.norm_epsilon) && c.norm_epsilon > 0 && c.norm_epsilon <= 1,
          "--norm-epsilon must be in (0, 1] (it keeps 1/sqrt(variance + eps) finite; 1e-5 is usual), got {}",
          c.norm_epsilon);
  require(std::isfinite(c.rotary_base) && c.rotary_base > 1,
          "--rotary-base must be a finite number above 1 (RoPE turns by base^(-2i/D); Llama uses 10000), got {}",
          c.rotary_base);
}

}  // namespace lightron
