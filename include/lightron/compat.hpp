// lightron/compat.hpp — the few differences between LibTorch 1.13 (Debian, CPU) and 2.x
// (pip, CUDA), in one place: the c10d backend base class, fused attention, fused AdamW,
// autocast, and CUDA memory statistics. Everything else is written once for both.
#pragma once

// Gloo, the CPU backend for several ranks. c10d's ProcessGroupGloo.hpp compiles to nothing
// unless USE_C10D_GLOO is defined: CMake's `torch` target defines it, a plain `g++` does not.
// Define it here, before any torch header, when both that header and Gloo's own headers
// (Debian: libgloo-dev) are on the include path. A pip LibTorch 2.x ships the first without
// the second: then nothing changes, as when the build system already defines it. (The c10d
// headers need no USE_DISTRIBUTED.)
#if !defined(USE_C10D_GLOO) && __has_include(<gloo/algorithm.h>) && \
    __has_include(<torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>)
#define USE_C10D_GLOO 1
#endif

#include <torch/torch.h>
#include <torch/version.h>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#if TORCH_VERSION_MAJOR >= 2
#include <torch/csrc/distributed/c10d/Backend.hpp>
#endif
#if defined(LIGHTRON_WITH_CUDA) && __has_include(<c10/cuda/CUDACachingAllocator.h>)
#include <c10/cuda/CUDACachingAllocator.h>
#define LIGHTRON_CUDA_MEMORY_STATS 1
#endif

#include <ATen/autocast_mode.h>

namespace lightron {

// Why this build has no Gloo path ("" when it has one), for the error a multi-rank CPU run
// raises: the fix differs for each reason.
#if !__has_include(<torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>)
inline constexpr const char* kNoGlooReason = "this LibTorch has no c10d/ProcessGroupGloo.hpp";
#elif !__has_include(<gloo/algorithm.h>)
inline constexpr const char* kNoGlooReason =
    "Gloo's headers (gloo/algorithm.h) are not on the include path: install libgloo-dev (Debian) or add them "
    "with -I";
#else
inline constexpr const char* kNoGlooReason = "";
#endif

#if TORCH_VERSION_MAJOR >= 2
using BackendPtr = c10::intrusive_ptr<c10d::Backend>;  // Gloo/NCCL derive from Backend in 2.x
#else
using BackendPtr = c10::intrusive_ptr<c10d::ProcessGroup>;  // ... and from ProcessGroup in 1.13
#endif

// Fused causal attention (flash / memory-efficient kernels) exists from 2.0 on.
inline bool fused_attention_available(const torch::Tensor& q) {
#if TORCH_VERSION_MAJOR >= 2
  return q.is_cuda();
#else
  (void)q;
  return false;
#endif
}

inline torch::Tensor fused_causal_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
#if TORCH_VERSION_MAJOR >= 2
  return at::scaled_dot_product_attention(q, k, v, {}, /*dropout_p=*/0.0, /*is_causal=*/true);
#else
  (void)k, (void)v;
  TORCH_CHECK(false, "fused attention needs LibTorch 2.x");
  return q;
#endif
}

// t_i *= scale for every tensor, scale a 0-dim tensor on their device (no host sync).
inline void scale_tensors(std::vector<torch::Tensor>& tensors, const torch::Tensor& scale) {
#if TORCH_VERSION_MAJOR >= 2
  at::_foreach_mul_(tensors, scale);
#else
  for (auto& t : tensors) t.mul_(scale);  // 1.13 has no _foreach_mul_ by a tensor
#endif
}

// AdamW as one fused kernel per step (LibTorch >= 2.1, CUDA): it reads p, g, m and v once
// and writes p, m and v once, where the _foreach_ formulation in train.hpp makes ~9 passes.
// The same update rule, so either path reproduces the other to rounding.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
#define LIGHTRON_HAVE_FUSED_ADAMW 1
#endif

inline bool fused_adamw_available(const torch::Tensor& p) {
#ifdef LIGHTRON_HAVE_FUSED_ADAMW
  return p.is_cuda();
#else
  (void)p;
  return false;
#endif
}

inline void fused_adamw(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads,
                        const std::vector<torch::Tensor>& exp_avgs, const std::vector<torch::Tensor>& exp_avg_sqs,
                        int64_t step, double lr, double beta1, double beta2, double weight_decay, double eps) {
#ifdef LIGHTRON_HAVE_FUSED_ADAMW
  // The kernel reads the (already incremented) step count from a float tensor per parameter.
  const std::vector<torch::Tensor> steps(params.size(), torch::full({}, double(step), grads[0].options().dtype(torch::kFloat)));
  at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/at::TensorList(), steps, lr, beta1, beta2,
                    weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
#else
  (void)params, (void)grads, (void)exp_avgs, (void)exp_avg_sqs, (void)step;
  (void)lr, (void)beta1, (void)beta2, (void)weight_decay, (void)eps;
  TORCH_CHECK(false, "fused AdamW needs LibTorch 2.1 or later");
#endif
}

// bf16 autocast on CUDA for the lifetime of the guard: matrix products in bf16, weights
// stay fp32 (the master copy), and the cast-weight cache is cleared when the outermost
// guard ends (as Python's `with torch.autocast(...)` does), so the next step casts afresh.
class AutocastGuard {
 public:
  explicit AutocastGuard(bool enabled) : enabled_(enabled) {
    if (!enabled_) return;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    previous_ = at::autocast::is_autocast_enabled(at::kCUDA);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
#else
    previous_ = at::autocast::is_enabled();
    at::autocast::set_enabled(true);
    at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
#endif
    at::autocast::increment_nesting();
  }
  ~AutocastGuard() {
    if (!enabled_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    at::autocast::set_autocast_enabled(at::kCUDA, previous_);
#else
    at::autocast::set_enabled(previous_);
#endif
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool enabled_, previous_ = false;
};

// Peak bytes allocated on a CUDA device (0 when this build has no CUDA statistics).
inline int64_t cuda_peak_bytes(const torch::Device& device) {
#ifdef LIGHTRON_CUDA_MEMORY_STATS
  if (!device.is_cuda()) return 0;
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
  return stats.allocated_bytes[/*StatType::AGGREGATE=*/0].peak;
#else
  (void)device;
  return 0;
#endif
}

}  // namespace lightron
