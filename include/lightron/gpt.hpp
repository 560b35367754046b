// lightron/gpt.hpp — the GPT model, in two flavours selected by GPTConfig (gpt_config.hpp):
//   GPT-2: learned positions, LayerNorm, GELU (tanh form, as GPT-2), biases, tied embeddings.
//   Llama: rotary positions (RoPE), RMSNorm, SwiGLU, grouped-query attention, no biases,
//          untied output layer.
// Parameter names are GPT-2's (wte wpe h.N.ln_1 h.N.attn.c_attn h.N.attn.c_proj h.N.ln_2
// h.N.mlp.c_fc h.N.mlp.c_proj ln_f lm_head), so a HuggingFace export is a rename table.
//
// The model knows nothing about ranks. Its linear layers, embedding and loss are swappable
// (held behind the small interfaces below) so that tensor_parallel.hpp and
// pipeline_parallel.hpp can shard an existing, fully initialised model in place.
// Leaves out: dropout (parity tests compare layouts exactly), KV caches.
// Introduced in chapter 0.
#pragma once

#include "compat.hpp"
#include "core.hpp"
#include "gpt_config.hpp"  // GPTConfig, validate_model_config
#include "kernels.hpp"     // CausalAttentionCPU, cross_entropy_loss, future_positions, gelu_tanh

#include <cmath>   // sqrt
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace lightron {

// ---- the swappable parts -------------------------------------------------------------

// y = x Wᵀ + b, W of shape (out, in). tensor_parallel.hpp substitutes its split versions.
struct LinearLayer : torch::nn::Module {
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
};

struct Linear : LinearLayer {
  torch::Tensor weight, bias;  // (out, in), (out) or undefined
  Linear(int64_t in, int64_t out, bool with_bias) {
    weight = register_parameter("weight", torch::empty({out, in}));
    if (with_bias) bias = register_parameter("bias", torch::zeros({out}));
  }
  torch::Tensor forward(const torch::Tensor& x) override { return lightron::linear(x, weight, bias); }
};

// Token ids -> vectors: (B, T) -> (B, T, C).
struct Embedding : torch::nn::Module {
  torch::Tensor weight;  // (V, C)
  Embedding() = default;
  Embedding(int64_t num, int64_t dim) { weight = register_parameter("weight", torch::empty({num, dim})); }
  virtual torch::Tensor forward(const torch::Tensor& ids) { return torch::embedding(weight, ids); }
};

// The output layer when it shares the token embedding's weight (GPT-2): no parameter of its
// own, so the weight is counted, updated and saved once, as wte.weight.
struct TiedLinear : LinearLayer {
  std::shared_ptr<Embedding> wte;
  explicit TiedLinear(std::shared_ptr<Embedding> e) : wte(std::move(e)) {}
  torch::Tensor forward(const torch::Tensor& x) override { return lightron::linear(x, wte->weight); }
};

// LayerNorm (weight, bias) or RMSNorm (weight only), computed in fp32.
struct Norm : torch::nn::Module {
  torch::Tensor weight, bias;
  bool rms;
  double eps;
  Norm(int64_t dim, bool rms_norm, double epsilon) : rms(rms_norm), eps(epsilon) {
    weight = register_parameter("weight", torch::ones({dim}));
    if (!rms) bias = register_parameter("bias", torch::zeros({dim}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto xf = x.to(torch::kFloat);
    if (!rms) return torch::layer_norm(xf, {xf.size(-1)}, weight, bias, eps).to(x.scalar_type());
    auto y = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
    return (y * weight).to(x.scalar_type());
  }
};

// ---- attention -------------------------------------------------------------------------

// The sequence position of each of a rank's T tokens: 0..T-1, unless a parallelism that splits
// the sequence (context_parallel.hpp) swaps in the global positions of its tokens.
using Positions = std::function<torch::Tensor(int64_t T, torch::Device device)>;  // -> (T) int64
inline torch::Tensor contiguous_positions(int64_t T, torch::Device device) {
  return torch::arange(T, torch::TensorOptions().dtype(torch::kLong).device(device));
}

// RoPE as in HuggingFace Llama ("rotate half"): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin),
// the angles from each token's position (default 0..T-1).
inline torch::Tensor apply_rotary(const torch::Tensor& x, double base, torch::Tensor positions = {}) {  // x: (B, H, T, D)
  const int64_t T = x.size(2), D = x.size(3);
  auto opts = torch::TensorOptions().dtype(torch::kFloat).device(x.device());
  if (!positions.defined()) positions = contiguous_positions(T, x.device());
  auto inv_freq = torch::pow(base, -torch::arange(0, D, 2, opts) / static_cast<double>(D));  // (D/2)
  auto freqs = torch::outer(positions.to(opts), inv_freq);                                 // (T, D/2)
  auto emb = torch::cat({freqs, freqs}, -1);                                               // (T, D)
  auto xf = x.to(torch::kFloat);
  auto halves = xf.chunk(2, -1);
  auto rotated = torch::cat({-halves[1], halves[0]}, -1);
  return (xf * emb.cos() + rotated * emb.sin()).to(x.scalar_type());
}

// Grouped-query attention: head h reads group h / (H/G). (B, G, T, D) -> (B, H, T, D).
inline torch::Tensor repeat_groups(const torch::Tensor& kv, int64_t heads) {
  return kv.size(1) == heads ? kv : kv.repeat_interleave(heads / kv.size(1), /*dim=*/1);
}

// softmax(q kᵀ / sqrt(D) + causal mask) v, the softmax in fp32. q, k, v: (B, H, T, D). The maths
// as written; causal_attention below runs the same with fused kernels where there are some.
inline torch::Tensor causal_attention_unfused(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  const int64_t T = q.size(2);
  auto scores = torch::matmul(q.to(torch::kFloat), k.to(torch::kFloat).transpose(-2, -1)) /
                std::sqrt(static_cast<double>(q.size(-1)));  // (B, H, T, T)
  auto probs = torch::softmax(scores.masked_fill(future_positions(T, q.options()), -INFINITY), -1).to(v.scalar_type());
  return torch::matmul(probs, v);  // (B, H, T, D)
}

// The same of q (B, H, T, D) and k, v (B, G, T, D) (grouped-query attention).
inline torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& kv_k, const torch::Tensor& kv_v) {
  const auto k = repeat_groups(kv_k, q.size(1)), v = repeat_groups(kv_v, q.size(1));
  if (fused_attention_available(q)) return fused_causal_attention(q, k, v);  // CUDA, LibTorch 2.x
  if (CausalAttentionCPU::applies(q, k, v)) return CausalAttentionCPU::apply(q, k, v);  // fp32 CPU: kernels.hpp
  return causal_attention_unfused(q, k, v);
}

struct Attention : torch::nn::Module {
  std::shared_ptr<LinearLayer> c_attn, c_proj;  // fused [Q | K | V] rows, and the output
  int64_t num_heads, num_groups, head_dim;      // heads and groups held here (H/tp, G/tp under TP)
  bool rope;
  double rotary_base;
  // softmax(q kᵀ / sqrt(D)) v of q (B, H, T, D) and k, v (B, G, T, D); recompute.hpp swaps in a
  // recomputed one (selective recompute), context_parallel.hpp ring attention.
  std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&)> core = causal_attention;
  Positions positions = contiguous_positions;  // for RoPE
  explicit Attention(const GPTConfig& c)
      : num_heads(c.num_attention_heads), num_groups(c.query_groups()), head_dim(c.head_dim()),
        rope(c.rope()), rotary_base(c.rotary_base) {
    c_attn = register_module("c_attn", std::make_shared<Linear>(c.hidden_size, c.qkv_size(), c.add_bias_linear));
    c_proj = register_module("c_proj", std::make_shared<Linear>(c.hidden_size, c.hidden_size, c.add_bias_linear));
  }
  torch::Tensor forward(const torch::Tensor& x) {  // (B, T, C) -> (B, T, C)
    auto qkv = c_attn->forward(x);                 // (B, T, (H + 2G) D)
    const int64_t B = qkv.size(0), T = qkv.size(1);
    auto parts = qkv.split({num_heads * head_dim, num_groups * head_dim, num_groups * head_dim}, -1);  // q | k | v
    auto heads = [&](const torch::Tensor& t, int64_t n) {  // (B, T, n D) -> (B, n, T, D)
      return t.view({B, T, n, head_dim}).transpose(1, 2);
    };
    auto q = heads(parts[0], num_heads), k = heads(parts[1], num_groups), v = heads(parts[2], num_groups);  // (B, H|G, T, D)
    if (rope) {
      const auto at = positions(T, x.device());
      q = apply_rotary(q, rotary_base, at);
      k = apply_rotary(k, rotary_base, at);
    }
    auto y = core(q, k, v).transpose(1, 2).reshape({B, T, num_heads * head_dim});  // (B, T, H D)
    return c_proj->forward(y);  // (B, T, C)
  }
};

// GELU MLP (GPT-2) or SwiGLU (Llama: c_fc holds the gate rows, then the up rows).
struct MLP : torch::nn::Module {
  std::shared_ptr<LinearLayer> c_fc, c_proj;
  bool swiglu;
  explicit MLP(const GPTConfig& c) : swiglu(c.swiglu) {
    const int64_t fc_out = c.swiglu ? 2 * c.ffn() : c.ffn();
    c_fc = register_module("c_fc", std::make_shared<Linear>(c.hidden_size, fc_out, c.add_bias_linear));
    c_proj = register_module("c_proj", std::make_shared<Linear>(c.ffn(), c.hidden_size, c.add_bias_linear));
  }
  torch::Tensor forward(const torch::Tensor& x) {  // (B, T, C) -> (B, T, C)
    auto h = c_fc->forward(x);  // (B, T, F) or (B, T, 2F)
    if (swiglu) {
      auto gate_up = h.chunk(2, -1);
      h = torch::silu(gate_up[0]) * gate_up[1];  // (B, T, F)
    } else {
      h = gelu_tanh(h);  // torch::gelu(h, "tanh"), kernels.hpp
    }
    return c_proj->forward(h);  // (B, T, C)
  }
};

// What is applied to a model may wrap the forward of a block or of the whole GPT (zero3.hpp
// gathers sharded weights around it): each wrapper gets the input and the forward it wraps.
using Forward = std::function<torch::Tensor(const torch::Tensor&)>;
using ForwardWrapper = std::function<torch::Tensor(const torch::Tensor&, const Forward&)>;
inline torch::Tensor run_wrapped(const std::vector<ForwardWrapper>& wrappers, const Forward& plain, const torch::Tensor& x) {
  if (wrappers.empty()) return plain(x);
  Forward f = plain;
  for (const auto& w : wrappers) f = [w, f](const torch::Tensor& in) { return w(in, f); };
  return f(x);
}

struct Block : torch::nn::Module {
  std::shared_ptr<Norm> ln_1, ln_2;
  std::shared_ptr<Attention> attn;
  std::shared_ptr<MLP> mlp;
  explicit Block(const GPTConfig& c) {
    ln_1 = register_module("ln_1", std::make_shared<Norm>(c.hidden_size, c.rms_norm(), c.norm_epsilon));
    attn = register_module("attn", std::make_shared<Attention>(c));
    ln_2 = register_module("ln_2", std::make_shared<Norm>(c.hidden_size, c.rms_norm(), c.norm_epsilon));
    mlp = register_module("mlp", std::make_shared<MLP>(c));
  }
  std::vector<ForwardWrapper> wrappers;  // none unless applied (run_wrapped)
  torch::Tensor forward(const torch::Tensor& x) {
    return run_wrapped(wrappers, [this](const torch::Tensor& in) { return plain_forward(in); }, x);
  }
  // [snippet: block_forward]
  torch::Tensor plain_forward(const torch::Tensor& x) {  // pre-norm residual block, (B, T, C)
    auto h = x + attn->forward(ln_1->forward(x));
    return h + mlp->forward(ln_2->forward(h));
  }
  // [end snippet: block_forward]
};

// Blocks one after the other: x -> block_0 -> block_1 -> ...
inline torch::Tensor run_in_order(const std::vector<std::shared_ptr<Block>>& blocks, torch::Tensor x) {
  for (auto& block : blocks) x = block->forward(x);
  return x;
}

struct GPT : torch::nn::Module {
  GPTConfig config;
  std::shared_ptr<Embedding> wte, wpe;  // wpe only with learned positions
  std::shared_ptr<torch::nn::Module> h; // children "0".."L-1" (their global layer numbers)
  std::vector<std::shared_ptr<Block>> blocks;
  std::shared_ptr<Norm> ln_f;
  std::shared_ptr<LinearLayer> lm_head;  // TiedLinear (not registered) or Linear
  // (logits, labels) -> mean loss; tensor_parallel.hpp swaps in the vocab-parallel one.
  std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)> loss_fn = cross_entropy_loss;
  Positions positions = contiguous_positions;  // for wpe; context_parallel.hpp swaps in its own
  // Runs a run of blocks; recompute.hpp swaps in one that keeps fewer activations (full recompute).
  std::function<torch::Tensor(const std::vector<std::shared_ptr<Block>>&, torch::Tensor)> run_blocks = run_in_order;

  explicit GPT(const GPTConfig& c) : config(c) {
    validate_model_config(c);
    wte = register_module("wte", std::make_shared<Embedding>(c.vocab_size, c.hidden_size));
    if (!c.rope()) wpe = register_module("wpe", std::make_shared<Embedding>(c.max_positions(), c.hidden_size));
    h = register_module("h", std::make_shared<torch::nn::Module>());
    for (int64_t i = 0; i < c.num_layers; ++i)
      blocks.push_back(h->register_module(std::to_string(i), std::make_shared<Block>(c)));
    ln_f = register_module("ln_f", std::make_shared<Norm>(c.hidden_size, c.rms_norm(), c.norm_epsilon));
    if (c.tied()) lm_head = std::make_shared<TiedLinear>(wte);
    else lm_head = register_module("lm_head", std::make_shared<Linear>(c.hidden_size, c.vocab_size, false));
    init_weights();
  }

  // Normal(0, std) for weights, std/sqrt(2L) for the projections that write into the
  // residual stream (attn.c_proj, mlp.c_proj; GPT-2 and Megatron), zero biases, unit norms.
  // Drawn in registration order from the global generator: the seed fixes every weight.
  void init_weights() {
    torch::NoGradGuard no_grad;
    const double scaled_std = config.init_method_std / std::sqrt(2.0 * config.num_layers);
    for (auto& p : named_parameters()) {
      const std::string& name = p.key();
      if (name.find("ln_") != std::string::npos) continue;  // norms keep ones / zeros
      if (name_ends_with(name, ".bias")) p.value().zero_();
      else p.value().normal_(0.0, name_ends_with(name, "c_proj.weight") ? scaled_std : config.init_method_std);
    }
  }

  torch::Tensor embed(const torch::Tensor& ids) {  // (B, T) -> (B, T, C)
    auto x = wte->forward(ids);  // sequence parallel: this rank's (B, T/tp, C), summed over tp
    if (wpe) x = x + wpe->forward(positions(ids.size(1), ids.device()));
    return x;
  }
  torch::Tensor logits(const torch::Tensor& x) { return lm_head->forward(ln_f->forward(x)); }  // (B, T, V)
  std::vector<ForwardWrapper> wrappers;  // none unless applied (run_wrapped)
  torch::Tensor forward(const torch::Tensor& ids) {
    return run_wrapped(wrappers, [this](const torch::Tensor& in) { return plain_forward(in); }, ids);
  }
  // [snippet: gpt_forward]
  torch::Tensor plain_forward(const torch::Tensor& ids) {
    auto x = embed(ids);
    x = run_blocks(blocks, x);
    return logits(x);
  }
  // [end snippet: gpt_forward]
  torch::Tensor loss(const torch::Tensor& ids, const torch::Tensor& labels) { return loss_fn(forward(ids), labels); }
};

}  // namespace lightron
