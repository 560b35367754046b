// lightron/kernels.hpp — five operations of the step done better than LibTorch's defaults,
// found by profiling one step on both sides (bench/profile_step.py) and timing the pieces:
//   * CausalAttentionCPU: attention with each head done start to finish by one thread, its
//     scores in cache, instead of B·H small products one after another and a pass over all
//     scores for each step in between. Same numbers up to the order of the sums.
//   * linear: y = x Wᵀ + b, whose backward runs dx and dW at once, one per thread.
//   * cross_entropy_loss: mean cross-entropy whose backward writes the gradient into the
//     log-probabilities it saved, (exp(log p) - onehot) · g / N, instead of allocating an N×V
//     one-hot gradient (nll_loss) and a third N×V tensor (log_softmax's backward).
//   * gelu_tanh: GPT-2's GELU in one pass in the CPU's widest vectors (LibTorch 1.13's CPU
//     kernels stop at AVX2), with an exponential that needs no cancellation-prone 1 + tanh.
//   * adamw_one_pass: AdamW on the CPU in one pass over p, g, m and v, where the _foreach_ form
//     (train.hpp) makes eight.
// Each applies to fp32 CPU tensors with more than one thread (the loss: everywhere); otherwise
// the plain form runs. Leaves out: double backward (refused, with a one-line error).
// Introduced in chapter 0 (speed); bench/throughput.sh measures what they are worth.
#pragma once

#include <torch/torch.h>

#include <ATen/Parallel.h>  // parallel_for

#include "gelu_simd.hpp"  // the GELU below in vector registers (plumbing)

#include <algorithm>  // min
#include <cmath>      // pow, sqrt
#include <cstring>    // memcpy
#include <limits>
#include <vector>

namespace lightron {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// Runs fn(i) for i in [0, n), the i shared out among ATen's threads (one thread per i; inside,
// ATen and an OpenMP OpenBLAS run single-threaded). Without OpenMP: in order, on this thread.
template <typename F>
void over_threads(int64_t n, const F& fn) {
  at::parallel_for(0, n, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    torch::NoGradGuard no_grad;  // grad mode is per thread: the pool's threads have it on
    for (int64_t i = begin; i < end; ++i) fn(i);
  });
}

// Whether the kernels below take over. With one thread there is nothing to share out, and the
// plain forms keep their numbers to the last bit: the mpi parity tests and the tutorials run one
// thread per rank (with the attention kernel there, GPT-2's pp 4 final weights drifted 1.45e-6
// from one rank's, just past the 1e-5·max + 1e-6 parity bound; cause not found).
inline bool threads_to_share() { return at::get_num_threads() > 1; }
inline bool fp32_on_cpu(const torch::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == torch::kFloat; }

// (T, T), true above the diagonal: the future positions a causal query must not see.
inline torch::Tensor future_positions(int64_t T, const torch::TensorOptions& like) {
  return torch::ones({T, T}, like.dtype(torch::kBool)).triu(/*diagonal=*/1);
}

// Backward that computes without building a graph cannot give second derivatives: it refuses.
inline void refuse_double_backward(const char* what) {
  TORCH_CHECK(!torch::GradMode::is_enabled(), what, ": no double backward (create_graph)");
}

// y = softmax(q kᵀ / sqrt(D) + causal mask) v, q, k, v (B, H, T, D), fp32 on the CPU: gpt.hpp's
// causal_attention, each of the B·H heads done start to finish by one thread while its T×T
// scores are in cache. Backward, per head (P the probabilities, S the scores):
//   dV = Pᵀ dY;  dP = dY Vᵀ;  dS = P ∘ (dP - rowsum(dP ∘ P)) / sqrt(D);  dQ = dS K;  dK = dSᵀ Q
// Saves q, k, v and P, as the unfused form does. LibTorch 1.13's CPU bmm (without MKL) runs the
// B·H products one after another, each split over the threads, and every step in between is a
// pass over all B·H·T·T scores.
struct CausalAttentionCPU : torch::autograd::Function<CausalAttentionCPU> {
  static bool applies(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
    return threads_to_share() && fp32_on_cpu(q) && fp32_on_cpu(k) && fp32_on_cpu(v) && q.dim() == 4 &&
           k.sizes() == q.sizes() && v.sizes() == q.sizes();
  }
  // Head i = b·H + h of a (B, H, T, D) tensor of any strides: a (T, D) view, which BLAS reads in
  // place (as long as one of its strides is 1).
  static torch::Tensor head(const torch::Tensor& t, int64_t i) { return t.select(0, i / t.size(1)).select(0, i % t.size(1)); }
  // (B, H, T, D) sizes laid out as (B, T, H, D): the layout c_proj reads, so y needs no copy.
  static torch::Tensor empty_heads(const torch::Tensor& like) {
    return torch::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options()).transpose(1, 2);
  }
  // q, k and v are saved contiguous, as the unfused form's matmuls save them: a view into the
  // fused QKV projection's output would keep all of it alive (memory.hpp counts the copies).
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& q_in, const torch::Tensor& k_in,
                               const torch::Tensor& v_in) {
    const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
    const int64_t N = q.size(0) * q.size(1), T = q.size(2);
    auto probs = torch::empty({N, T, T}, q.options()), y = empty_heads(q);
    const auto future = future_positions(T, q.options());
    const double sqrt_d = std::sqrt(static_cast<double>(q.size(3)));
    over_threads(N, [&](int64_t i) {
      auto p = probs.select(0, i), y_i = head(y, i);
      const auto scores = torch::mm(head(q, i), head(k, i).t()).div_(sqrt_d).masked_fill_(future, -INFINITY);
      at::_softmax_out(p, scores, /*dim=*/-1, /*half_to_float=*/false);
      at::mm_out(y_i, p, head(v, i));
    });
    ctx->save_for_backward({q, k, v, probs});
    return y;
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grad) {
    refuse_double_backward("causal attention (CausalAttentionCPU)");
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &probs = saved[3], &dy = grad[0];
    auto dq = empty_heads(q), dk = empty_heads(k), dv = empty_heads(v);
    const double sqrt_d = std::sqrt(static_cast<double>(q.size(3)));
    over_threads(probs.size(0), [&](int64_t i) {
      auto dq_i = head(dq, i), dk_i = head(dk, i), dv_i = head(dv, i);
      const auto p = probs.select(0, i), dy_i = head(dy, i);
      at::mm_out(dv_i, p.t(), dy_i);
      const auto dp = torch::mm(dy_i, head(v, i).t());
      const auto ds = at::_softmax_backward_data(dp, p, /*dim=*/-1, torch::kFloat).div_(sqrt_d);
      at::mm_out(dq_i, ds, head(k, i));
      at::mm_out(dk_i, ds.t(), head(q, i));
    });
    return {dq, dk, dv};
  }
};

// y = x Wᵀ + b for fp32 CPU tensors, with a backward that runs its two matrix products at once,
// one per thread, instead of one after the other each split over the threads:
//   dx = dy W  and  dW = dyᵀ x  (as many FLOPs each: an even split),  db = Σ dy.
// At the tiny benchmark's sizes a product on one thread wastes less in synchronisation than
// half a product on each. Saves x and W, as addmm's backward does.
struct LinearCPU : torch::autograd::Function<LinearCPU> {
  static bool applies(const torch::Tensor& x, const torch::Tensor& weight) {
    return threads_to_share() && fp32_on_cpu(x) && fp32_on_cpu(weight) && x.dim() >= 2;
  }
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& weight,
                               const torch::Tensor& bias) {
    ctx->save_for_backward({x, weight});  // no bias: linear() passes an empty one, which needs no gradient
    return torch::linear(x, weight, bias.numel() > 0 ? bias : torch::Tensor());
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grad) {
    refuse_double_backward("lightron::linear");
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &weight = saved[1];
    const auto dy = grad[0].reshape({-1, weight.size(0)}), x2 = x.reshape({-1, weight.size(1)});
    torch::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) dx = torch::empty(x2.sizes(), x.options());
    if (ctx->needs_input_grad(1)) dw = torch::empty(weight.sizes(), weight.options());
    over_threads(2, [&](int64_t i) {
      if (i == 0 && dx.defined()) at::mm_out(dx, dy, weight);
      if (i == 1 && dw.defined()) at::mm_out(dw, dy.t(), x2);
    });
    if (ctx->needs_input_grad(2)) db = dy.sum(0);
    return {dx.defined() ? dx.view(x.sizes()) : dx, dw, db};
  }
};

// torch::linear, through LinearCPU where that applies. Every linear layer of lightron's models
// (whole or tensor-parallel) calls this one, so that every layout runs the same products.
inline torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias = {}) {
  if (LinearCPU::applies(x, weight))  // no bias: an empty tensor (apply() refuses undefined ones)
    return LinearCPU::apply(x, weight, bias.defined() ? bias : torch::empty({0}, weight.options()));
  return torch::linear(x, weight, bias);
}

// GELU, tanh form (GPT-2's), y = 0.5 x (1 + tanh u) with u = √(2/π) (x + 0.044715 x³), written
// as y = x s with s = 0.5 (1 + tanh u) = 1 / (1 + e^(-2u)), and its derivative
//   dy/dx = s + 2 x s (1 - s) · √(2/π) (1 + 3 · 0.044715 x²).
// For fp32 CPU tensors, one pass over x (and dy) in the CPU's widest vectors (AVX-512, AVX2 or
// SSE; LibTorch 1.13 runs its own at AVX2), e^z by a polynomial (relative error ~1e-7, as
// LibTorch's). x is clamped to ±10 where s no longer moves in fp32 (below -10: y = 0, as
// LibTorch's 0.5 x (1 + (-1)); NaN stays NaN). Saves x, as LibTorch's gelu does. The vector
// code is gelu_simd.hpp's (x86-64 with GCC or Clang; elsewhere LibTorch's gelu runs).
struct GeluCPU : torch::autograd::Function<GeluCPU> {
  static bool applies(const torch::Tensor& x) {
#ifdef LIGHTRON_GELU_KERNEL
    return threads_to_share() && fp32_on_cpu(x);
#else
    return false;  // not x86-64 with GCC or Clang: LibTorch's
#endif
  }
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x) {
    ctx->save_for_backward({x});
#ifdef LIGHTRON_GELU_KERNEL
    return gelu_simd::apply(x);
#else
    return torch::gelu(x, "tanh");
#endif
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grad) {
    refuse_double_backward("gelu (GeluCPU)");
    const auto x = ctx->get_saved_variables()[0];
#ifdef LIGHTRON_GELU_KERNEL
    return {gelu_simd::apply(x, grad[0])};
#else
    return {at::gelu_backward(grad[0], x, "tanh")};
#endif
  }
};
// torch::gelu(x, "tanh"), through GeluCPU where that applies.
inline torch::Tensor gelu_tanh(const torch::Tensor& x) {
  return GeluCPU::applies(x) ? GeluCPU::apply(x) : torch::gelu(x, "tanh");
}

// loss = -mean_i log softmax(x_i)[y_i] over N rows, in fp32 (log_softmax upcasts as it reads:
// no fp32 copy of bf16 logits). Backward: dx = (softmax(x) - onehot(y)) · g / N, computed in
// place in the saved log-probabilities, returned in the logits' dtype. The same operations in
// the same order as log_softmax's and nll_loss's backwards: exp(log p)·s, and exp(log p)·s - s
// at the label (s = g / N); a test compares the two bit for bit.
struct CrossEntropy : torch::autograd::Function<CrossEntropy> {
  static constexpr int64_t kNoIgnoredLabel = std::numeric_limits<int64_t>::min();
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& logits, const torch::Tensor& labels) {  // (N, V), (N)
    auto log_probs = torch::log_softmax(logits, -1, torch::kFloat);  // (N, V) fp32
    // every label counts: none is ignored (ignore_index can match no label, so a negative
    // label is refused as out of bounds rather than skipped)
    auto loss = torch::nll_loss(log_probs, labels, /*weight=*/{}, at::Reduction::Mean, kNoIgnoredLabel);
    ctx->saved_data["log_probs"] = log_probs;
    ctx->saved_data["labels"] = labels;
    ctx->saved_data["dtype"] = static_cast<int64_t>(logits.scalar_type());
    return loss;
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grad) {
    refuse_double_backward("cross_entropy_loss");
    auto saved = ctx->saved_data.find("log_probs");
    TORCH_CHECK(saved != ctx->saved_data.end(),
                "cross_entropy_loss: backward ran twice through one loss; its gradient reuses the saved log-probabilities");
    auto dx = saved->second.toTensor();  // becomes the gradient: no N×V tensor allocated
    ctx->saved_data.erase(saved);
    const auto labels = ctx->saved_data["labels"].toTensor();
    const auto step = grad[0].to(torch::kFloat) / static_cast<double>(dx.size(0));  // g / N, 0-dim
    dx.exp_().mul_(step);  // softmax · g / N
    dx.index_put_({torch::arange(dx.size(0), labels.options()), labels}, -step, /*accumulate=*/true);
    return {dx.to(static_cast<torch::ScalarType>(ctx->saved_data["dtype"].toInt())), torch::Tensor()};
  }
};

// Cross-entropy averaged over all tokens. logits (B, T, V) or (N, V), labels (B, T) or (N).
inline torch::Tensor cross_entropy_loss(const torch::Tensor& logits, const torch::Tensor& labels) {
  return CrossEntropy::apply(logits.flatten(0, -2), labels.reshape({-1}));
}

// Per element, in registers: m = β1 m + (1-β1) g;  v = β2 v + (1-β2) g²;
//   p = p (1 - lr·wd) - lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)
// (AdamW, Loshchilov & Hutter; torch.optim.AdamW's order). For fp32 CPU tensors, contiguous,
// with more than one thread, like the kernels above (one thread: the _foreach_ form).
using Tensors = std::vector<torch::Tensor>;
inline bool adamw_one_pass_applies(const Tensors& p, const Tensors& g, const Tensors& m, const Tensors& v) {
  if (!threads_to_share()) return false;
  for (const auto* list : {&p, &g, &m, &v})
    for (const auto& t : *list)
      if (!fp32_on_cpu(t) || !t.is_contiguous()) return false;
  return true;
}
struct AdamWConstants {
  float decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, sqrt_bias2, eps;
};
// Elements [begin, end) of one tensor. The loop vectorizes with OpenMP's simd and
// -fno-math-errno (CMake's LIGHTRON_OPENMP adds both); with errno every sqrt is a branch and the
// loop runs one element at a time. The numbers are the same either way (IEEE sqrt and /).
inline void adamw_elements(float* __restrict p, const float* __restrict g, float* __restrict m,
                           float* __restrict v, int64_t begin, int64_t end, const AdamWConstants& c) {
#ifdef _OPENMP
#pragma omp simd
#endif
  for (int64_t i = begin; i < end; ++i) {
    const float mi = c.beta1 * m[i] + c.one_minus_beta1 * g[i];
    const float vi = c.beta2 * v[i] + c.one_minus_beta2 * g[i] * g[i];
    m[i] = mi;
    v[i] = vi;
    p[i] = c.decay * p[i] + c.step_size * mi / (std::sqrt(vi) / c.sqrt_bias2 + c.eps);
  }
}
inline void adamw_one_pass(const Tensors& p, const Tensors& g, const Tensors& m, const Tensors& v, int64_t step,
                           double lr, double beta1, double beta2, double weight_decay, double eps) {
  const AdamWConstants c{float(1.0 - lr * weight_decay), float(beta1), float(beta2), float(1.0 - beta1),
                         float(1.0 - beta2), float(-lr / (1.0 - std::pow(beta1, double(step)))),
                         float(std::sqrt(1.0 - std::pow(beta2, double(step)))), float(eps)};
  for (size_t t = 0; t < p.size(); ++t) {
    float *P = p[t].data_ptr<float>(), *M = m[t].data_ptr<float>(), *V = v[t].data_ptr<float>();
    const float* G = g[t].data_ptr<float>();
    at::parallel_for(0, p[t].numel(), /*grain_size=*/1 << 15,
                     [&](int64_t begin, int64_t end) { adamw_elements(P, G, M, V, begin, end, c); });
    // written through pointers: bump the version counters as an in-place op would, so that
    // autograd still refuses a backward through a graph that saved the old weights
    for (const auto* list : {&p, &m, &v}) (*list)[t].unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace lightron
