// lightron/memory.hpp — how much memory each rank of a layout needs, before anything is
// allocated (`pretrain_gpt --dry-run`). Parameters, gradients and AdamW state are exact:
// the parameters are enumerated from the config, split by tp_shard_spec and assigned to
// pipeline ranks by pp_rank_holds_parameter, as the run itself does (a test checks the equality).
// Activations are an estimate: the tensors autograd keeps per layer and micro-batch, times
// the micro-batches a schedule holds in flight (chunks_in_flight). Chapter 3.
#pragma once

#include "zero.hpp"               // plan_buckets, zero_units: ZeRO's padding
#include "pipeline_schedule.hpp"  // chunks_in_flight
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

struct MemoryEstimate {
  int64_t parameters = 0;        // elements held by this rank
  int64_t parameter_bytes = 0, gradient_bytes = 0, optimizer_bytes = 0;  // exact
  int64_t activation_bytes = 0;  // estimate
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
                                      int64_t bucket_elements = 40000000) {
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
  if (zero_stage > 0 && layout.dp > 1) {
    std::vector<std::string> names;
    for (const auto& [name, numel] : held) names.push_back(name);
    const bool tied_here = c.tied() && p > 1 && (coords.pp == 0 || last);
    const int64_t padded = zero_padded_elements(held, layout.dp, bucket_elements, zero_units(names, zero_stage, tied_here));
    if (zero_stage == 3) m.parameter_bytes = 4 * padded / layout.dp;  // Ψ' = Σ buckets padded to dp
    m.gradient_bytes = zero_stage == 1 ? 4 * padded : 4 * padded / layout.dp;
    m.optimizer_bytes = 2 * 4 * padded / layout.dp;
  }
  // [end snippet: zero_memory]
  // Kept for backward per layer and micro-batch (fp32 elements): about 10 activations of
  // B·T·C (norms, residuals, projections; split by tp under sequence parallel), q, k, v
  // and the MLP's input/output (split by tp), and two (B, H/tp, T, T) attention matrices.
  const int64_t B = micro_batch, T = c.seq_length, C = c.hidden_size, H = c.num_attention_heads;
  const int64_t fc = c.swiglu ? 3 * c.ffn() : 2 * c.ffn();
  const int64_t per_layer = B * T * (10 * C / (sequence_parallel ? tp : 1) + (2 * c.qkv_size() + fc) / tp) +
                            2 * B * (H / tp) * T * T;
  // Chunks whose activations are held at once, as the schedule runs them (one micro-batch
  // at a time without a pipeline).
  // [snippet: activation_in_flight]
  const int64_t in_flight = p == 1 ? 1 : chunks_in_flight(schedule, micro_batches, p, v, coords.pp);
  const auto chunks = chunk_layers(c.num_layers, p * v);
  int64_t layers = 0;
  for (int64_t k = 0; k < v; ++k) layers += int64_t(chunks[k * p + coords.pp].size());
  const int64_t held_layers = p == 1 || v == 1 ? layers * in_flight : c.num_layers / (p * v) * in_flight;
  // ... plus the output layer's fp32 logits (B·T·V/tp) on the last stage.
  const int64_t logits = last ? B * T * c.vocab_size / tp : 0;
  m.activation_bytes = 4 * (per_layer * held_layers + logits);
  // [end snippet: activation_in_flight]
  return m;
}

}  // namespace lightron
