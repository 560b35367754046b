// lightron/kernels.hpp — three operations of the step done better than LibTorch's defaults,
// found by profiling one step on both sides (bench/profile_step.py):
//   * batched_matmul: attention's B·H small matrix products. LibTorch 1.13's CPU bmm (without
//     MKL) runs them one after another, each split over the threads; here the threads share out
//     the products, each single-threaded. Same numbers up to the order of the sums.
//   * cross_entropy_loss: mean cross-entropy whose backward writes the gradient into the
//     log-probabilities it saved, (exp(log p) - onehot) · g / N, instead of allocating an N×V
//     one-hot gradient (nll_loss) and a third N×V tensor (log_softmax's backward).
//   * adamw_one_pass: AdamW on the CPU in one pass over p, g, m and v, where the _foreach_ form
//     (train.hpp) makes eight.
// Leaves out: double backward of the loss (refused), broadcasting in batched_matmul (falls back).
// Introduced in chapter 0 (speed); bench/throughput.sh measures what they are worth.
#pragma once

#include <torch/torch.h>

#include <ATen/Parallel.h>  // parallel_for

#include <cmath>  // pow, sqrt
#include <limits>
#include <vector>

namespace lightron {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// Whether sharing the products out over the threads can run at all: on the CPU, with more than
// one thread, and compiled with OpenMP (without it at::parallel_for runs on one thread).
inline bool threaded_bmm_applies(const torch::Tensor& a, const torch::Tensor& b) {
#ifdef _OPENMP
  return a.device().is_cpu() && a.dim() == 3 && b.dim() == 3 && a.size(0) > 1 && a.size(0) == b.size(0) &&
         at::get_num_threads() > 1;
#else
  (void)a, (void)b;
  return false;
#endif
}

// a (N, n, k) @ b (N, k, m) -> (N, n, m), product i on one thread. Inside the parallel region
// ATen and an OpenMP OpenBLAS run single-threaded.
inline torch::Tensor bmm_over_threads(const torch::Tensor& a, const torch::Tensor& b) {
  if (!threaded_bmm_applies(a, b)) return torch::bmm(a, b);
  auto out = torch::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  at::parallel_for(0, a.size(0), /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    torch::NoGradGuard no_grad;  // grad mode is per thread: the pool's threads have it on
    for (int64_t i = begin; i < end; ++i) {
      auto out_i = out.select(0, i);
      at::mm_out(out_i, a.select(0, i), b.select(0, i));
    }
  });
  return out;
}

// d(a b) = da b + a db: grad_a = g bᵀ, grad_b = aᵀ g, both again over the threads.
struct ThreadedBmm : torch::autograd::Function<ThreadedBmm> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& a, const torch::Tensor& b) {
    ctx->save_for_backward({a, b});
    return bmm_over_threads(a, b);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grad) {
    const auto saved = ctx->get_saved_variables();
    torch::Tensor grad_a, grad_b;
    if (ctx->needs_input_grad(0)) grad_a = bmm_over_threads(grad[0], saved[1].transpose(1, 2));
    if (ctx->needs_input_grad(1)) grad_b = bmm_over_threads(saved[0].transpose(1, 2), grad[0]);
    return {grad_a, grad_b};
  }
};

// (..., n, k) @ (..., k, m) -> (..., n, m), the leading dimensions equal: torch::matmul, with
// the products shared out over the threads where that applies.
inline torch::Tensor batched_matmul(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.dim() < 3 || a.dim() != b.dim() || a.sizes().slice(0, a.dim() - 2) != b.sizes().slice(0, b.dim() - 2))
    return torch::matmul(a, b);
  const auto a3 = a.reshape({-1, a.size(-2), a.size(-1)}), b3 = b.reshape({-1, b.size(-2), b.size(-1)});
  if (!threaded_bmm_applies(a3, b3)) return torch::matmul(a, b);
  auto sizes = a.sizes().vec();
  sizes.back() = b.size(-1);
  return ThreadedBmm::apply(a3, b3).view(sizes);
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
    TORCH_CHECK(!torch::GradMode::is_enabled(), "cross_entropy_loss: no double backward (create_graph) through the loss");
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
// (AdamW, Loshchilov & Hutter; torch.optim.AdamW's order). For fp32 CPU tensors, contiguous.
using Tensors = std::vector<torch::Tensor>;
inline bool adamw_one_pass_applies(const Tensors& p, const Tensors& g, const Tensors& m, const Tensors& v) {
  for (const auto* list : {&p, &g, &m, &v})
    for (const auto& t : *list)
      if (!t.device().is_cpu() || t.scalar_type() != torch::kFloat || !t.is_contiguous()) return false;
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
