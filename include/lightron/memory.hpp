// lightron/memory.hpp — how much memory each rank of a layout needs, before anything is
// allocated (`pretrain_gpt --dry-run`). Parameters, gradients and AdamW state are exact:
// the parameters are enumerated from the config, split by tp_shard_spec and assigned to
// pipeline ranks by pp_rank_holds_parameter, as the run itself does (a test checks the equality).
// Activations are an estimate: the tensors lightron's layers keep for backward per block and
// micro-batch (fewer with recompute), walked through the schedule's forwards and backwards
// to find the most a rank holds at once; tests compare it with what a rank measurably holds
// (activation_meter.hpp). Chapter 3.
#pragma once

#include "zero.hpp"               // plan_buckets, zero_units: ZeRO's padding
#include "pipeline_schedule.hpp"  // pipeline_actions
#include "recompute.hpp"          // RecomputeOptions
#include "tp_model.hpp"

namespace lightron {

// Every parameter of the whole model with its shape, in the model's order.
inline std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes(const GPTConfig& c) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  const int64_t C = c.hidden_size, fc_out = c.swiglu ? 2 * c.ffn() : c.ffn();
  auto linear = [&](const std::string& name, int64_t in, int64_t outs, bool bias) {
    out.push_back({name + ".weight", {outs, in}});
    if (bias) out.push_back({name + ".bias", {outs}});
  };
  auto norm = [&](const std::string& name) {
    out.push_back({name + ".weight", {C}});
    if (!c.rms_norm()) out.push_back({name + ".bias", {C}});
  };
  out.push_back({"wte.weight", {c.vocab_size, C}});
  if (!c.rope()) out.push_back({"wpe.weight", {c.max_positions(), C}});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string h = "h." + std::to_string(i) + ".";
    norm(h + "ln_1");
    linear(h + "attn.c_attn", C, c.qkv_size(), c.add_bias_linear);
    linear(h + "attn.c_proj", C, C, c.add_bias_linear);
    norm(h + "ln_2");
    linear(h + "mlp.c_fc", C, fc_out, c.add_bias_linear);
    linear(h + "mlp.c_proj", c.ffn(), C, c.add_bias_linear);
  }
  norm("ln_f");
  if (!c.tied()) linear("lm_head", C, c.vocab_size, false);
  return out;
}

// ---- activations: what one forward leaves alive for backward, tensor by tensor ----------
// Counted as lightron's layers save them (fp32; B micro-batch, T sequence, C hidden, H heads,
// D head size, F MLP size, t = tp, s = t with sequence parallel else 1). Tensors of a few
// elements per token (norm statistics, masks of ids) and the T² causal mask are left out.
constexpr int64_t kCpuRngStateBytes = 5056;  // the CPU generator's state, kept per recomputed region

// A norm that feeds a linear layer keeps the linear's input (B, T, C) — its output, or with
// sequence parallel the all-gathered output — plus, for RMSNorm, x·rsqrt(mean(x²)) and x²
// (B, T/s, C) each (LibTorch 1.13's mean keeps its input for backward).
inline int64_t norm_elements(const GPTConfig& c, int64_t BT, int64_t s) {
  return BT * c.hidden_size + (c.rms_norm() ? 2 * BT / s * c.hidden_size : 0);
}

// One block, elements: two norms; the residual sum and the output (B, T/s, C); the attention
// core's q, k, v and its output (B, T, C/t each) and softmax (B, H/t, T, T); RoPE's cos and
// sin tables; the MLP's hidden activations (GELU: 2F, SwiGLU: 4F per token, split by t).
// Under cp, T is this rank's T/cp and ring attention keeps its inputs as selective recompute
// does, then its fp32 output and log-sum-exp (B, H/t, T) instead of the softmax.
inline int64_t block_elements(const GPTConfig& c, int64_t B, int64_t T, int64_t t, int64_t s, bool selective, bool ring) {
  const int64_t BT = B * T, C = c.hidden_size, H = c.num_attention_heads / t;
  const int64_t HD = C / t, GD = c.query_groups() / t * c.head_dim();
  int64_t qkv = 3 * HD;  // as the core's matmuls save them (copies where not contiguous)
  if (selective || ring)  // the core's inputs themselves; v, a view of c_attn's output, keeps it all
    qkv = HD + 2 * GD + (c.rope() ? HD + GD : 0);
  const int64_t core = ring ? BT * HD + B * H * T : selective ? 0 : B * H * T * T;
  const int64_t attention = BT * (qkv + HD) + core + (c.rope() ? 4 * T * c.head_dim() : 0);
  const int64_t mlp = BT * (c.swiglu ? 4 : 2) * c.ffn() / t;
  return 2 * norm_elements(c, BT, s) + 2 * BT / s * C + attention + mlp;
}

// One micro-batch's forward of a model chunk of `layers` blocks, bytes: its input (B, T/s, C),
// its blocks as recompute keeps them, and on the last chunk the final norm and the loss's
// (B, T, V/t) fp32 log-probabilities (softmax under tp); T is T/cp under context parallelism.
inline int64_t chunk_activation_bytes(const GPTConfig& c, int64_t micro_batch, int64_t t, bool sequence_parallel,
                                      const RecomputeOptions& r, int64_t layers, bool last, int64_t cp = 1) {
  const int64_t T = c.seq_length / cp, BT = micro_batch * T, s = sequence_parallel ? t : 1, C = c.hidden_size;
  const int64_t block = 4 * block_elements(c, micro_batch, T, t, s, r.selective(), cp > 1) +
                        (r.selective() ? kCpuRngStateBytes : 0);
  const int64_t kept_input = 4 * BT / s * C + kCpuRngStateBytes;  // a full-recompute region's output
  int64_t bytes = 4 * BT / s * C;
  if (!r.full()) bytes += layers * block;
  else if (r.uniform()) bytes += (layers + r.group(layers) - 1) / r.group(layers) * kept_input;
  else bytes += r.group(layers) * kept_input + (layers - r.group(layers)) * block;
  if (last) bytes += 4 * (norm_elements(c, BT, s) + BT * c.vocab_size / t);
  return bytes;
}

// The most bytes pipeline rank s holds at once, walking its actions as the engine runs them:
// a forward adds its chunk's bytes; a backward frees them, except the output the forward sent
// on (`sent`: 0 for the last chunk), which its send holds until the step ends.
inline int64_t peak_held_bytes(const std::string& schedule, int64_t m, int64_t p, int64_t v, int64_t s,
                               const std::vector<int64_t>& chunk_bytes, const std::vector<int64_t>& sent) {
  int64_t held = 0, peak = 0;
  for (const auto& a : pipeline_actions(schedule, m, p, v, s)) {
    held += a.forward ? chunk_bytes[a.chunk] : sent[a.chunk] - chunk_bytes[a.chunk];
    peak = std::max(peak, held);
  }
  return peak;
}

struct MemoryEstimate {
  int64_t parameters = 0;        // elements held by this rank
  int64_t parameter_bytes = 0, gradient_bytes = 0, optimizer_bytes = 0;  // exact
  int64_t activation_bytes = 0;  // estimate (measured: activation_meter.hpp)
};

// Under ZeRO (zero.hpp), the elements of this rank's gradient buckets, each padded to a
// multiple of dp (Ψ' >= Ψ): the trainer's own bucket plan, rebuilt from the shapes.
inline int64_t zero_padded_elements(const std::vector<std::pair<std::string, int64_t>>& held, int64_t dp,
                                    int64_t bucket_elements, const std::map<std::string, int64_t>& units) {
  std::vector<int64_t> numels, unit;
  for (const auto& [name, numel] : held) {
    numels.push_back(numel);
    unit.push_back(units.count(name) ? units.at(name) : -1);
  }
  int64_t padded = 0;
  for (const auto& bucket : plan_buckets(numels, bucket_elements, unit)) {
    int64_t elements = 0;
    for (size_t k : bucket) elements += numels[k];
    padded += (elements + dp - 1) / dp * dp;
  }
  return padded;
}

// Memory of the rank at `coords` of `layout` (fp32 parameters, gradients and two AdamW
// moments; under ZeRO stage 1 or 2 the moments, and at 2 the gradients, divided by dp).
inline MemoryEstimate estimate_memory(const GPTConfig& c, const Layout& layout, const Coords& coords,
                                      int64_t micro_batch, int64_t micro_batches, int64_t layers_per_virtual_stage,
                                      const std::string& schedule, bool sequence_parallel, int zero_stage = 0,
                                      int64_t bucket_elements = 40000000, const RecomputeOptions& recompute = {}) {
  const int64_t p = layout.pp, tp = layout.tp, v = virtual_stages(c.num_layers, p, layers_per_virtual_stage);
  const bool last = coords.pp == p - 1;
  MemoryEstimate m;
  std::vector<std::pair<std::string, int64_t>> held;
  for (const auto& [name, shape] : parameter_shapes(c)) {
    if (!pp_rank_holds_parameter(name, c.num_layers, p, v, coords.pp, c.tied())) continue;
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    held.emplace_back(name, tp_shard_spec(name, c).dim >= 0 ? numel / tp : numel);
    m.parameters += held.back().second;
  }
  m.parameter_bytes = m.gradient_bytes = 4 * m.parameters;
  m.optimizer_bytes = 2 * 4 * m.parameters;
  // [snippet: zero_memory]
  if (const int64_t dp = layout.dp * layout.cp; zero_stage > 0 && dp > 1) {  // sharded over dp (x cp)
    std::vector<std::string> names;
    for (const auto& [name, numel] : held) names.push_back(name);
    const bool tied_here = c.tied() && p > 1 && (coords.pp == 0 || last);
    const int64_t padded = zero_padded_elements(held, dp, bucket_elements, zero_units(names, zero_stage, tied_here));
    if (zero_stage == 3) m.parameter_bytes = 4 * padded / dp;  // Ψ' = Σ buckets padded to dp
    m.gradient_bytes = zero_stage == 1 ? 4 * padded : 4 * padded / dp;
    m.optimizer_bytes = 2 * 4 * padded / dp;
  }
  // [end snippet: zero_memory]
  // [snippet: activation_in_flight]
  std::vector<int64_t> chunk_bytes, sent;  // one micro-batch's forward of each chunk held here
  const auto chunks = chunk_layers(c.num_layers, p * v);
  for (int64_t k = 0; k < v; ++k) {
    const bool last_chunk = k * p + coords.pp == p * v - 1;
    chunk_bytes.push_back(chunk_activation_bytes(c, micro_batch, tp, sequence_parallel, recompute,
                                                 int64_t(chunks[k * p + coords.pp].size()), last_chunk, layout.cp));
    sent.push_back(last_chunk ? 0 : 4 * micro_batch * c.seq_length / layout.cp / (sequence_parallel ? tp : 1) * c.hidden_size);
  }
  m.activation_bytes = p == 1 ? chunk_bytes[0] : peak_held_bytes(schedule, micro_batches, p, v, coords.pp, chunk_bytes, sent);
  // [end snippet: activation_in_flight]
  return m;
}

}  // namespace lightron
