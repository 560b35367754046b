// lightron/gelu_simd.hpp — plumbing for kernels.hpp's GeluCPU: GPT-2's tanh GELU and its
// derivative over float arrays in the CPU's widest vectors (AVX-512, AVX2 or SSE, chosen once at
// run time), written with GCC/Clang vector extensions. The formula and why it is written as
// x / (1 + e^(-2u)) are in kernels.hpp. Defines LIGHTRON_GELU_KERNEL where it compiles
// (x86-64 with GCC or Clang).
#pragma once

#include <torch/torch.h>

#include <ATen/Parallel.h>  // parallel_for

#include <cstdint>
#include <cstring>  // memcpy

namespace lightron {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LIGHTRON_GELU_KERNEL 1
namespace gelu_simd {
#define LIGHTRON_INLINE inline __attribute__((always_inline))
// F: 4, 8 or 16 floats (SSE, AVX2, AVX-512), I: as many int32; each operation is per element.
// Vectors go by reference: by value, GCC warns that the ABI depends on the instruction set.
template <class F, class I>
struct Lanes {
  static LIGHTRON_INLINE void select(const I& mask, const F& a, F& v) { v = (F)((mask & (I)a) | (~mask & (I)v)); }
  static LIGHTRON_INLINE void clamp(F& v, float lo, float hi) {
    select((I)(v < lo), F{} + lo, v);
    select((I)(v > hi), F{} + hi, v);
  }
  // z = e^z: z = n ln2 + r with |r| <= ln2/2, e^r by Taylor to r⁷ (error < 2e-8), 2^n into the
  // exponent bits
  static LIGHTRON_INLINE void exp(F& z) {
    clamp(z, -87.0f, 88.0f);
    const F n = (z * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(z / ln2): 1.5·2^23 drops the fraction
    const F r = (z - n * 0.693145752f) - n * 1.42860677e-6f;   // ln2 in two parts, exact products
    F p = r * (1.0f / 5040) + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = ((p * r + 0.5f) * r + 1.0f) * r + 1.0f;
    z = p * (F)((__builtin_convertvector(n, I) + 127) << 23);
  }
  // v = y (forward: v unused on entry) or v = dx (backward: v = dy on entry)
  template <bool backward>
  static LIGHTRON_INLINE void gelu(const F& x, F& v) {
    constexpr float k = 0.7978845608028654f, a = 0.044715f;  // √(2/π), the cubic's coefficient
    F xc = x, s;
    clamp(xc, -10.0f, 10.0f);
    s = -2.0f * k * (xc + a * xc * xc * xc);
    exp(s);
    s = 1.0f / (1.0f + s);
    F out = backward ? v * (s + 2.0f * k * xc * s * (1.0f - s) * (1.0f + 3.0f * a * xc * xc)) : x * s;
    select((I)(x < -10.0f), backward ? 0.0f * v : F{}, out);  // 0·dy: a NaN gradient stays NaN
    v = out;
  }
  // out[i] = y or dx at x[i] (and dy[i]) for i in [0, n). The tail goes through zero-padded vectors.
  template <bool backward>
  static LIGHTRON_INLINE void map(const float* x, const float* dy, float* out, int64_t n) {
    constexpr int64_t w = sizeof(F) / sizeof(float);
    F a, b{};
    int64_t i = 0;
    for (; i + w <= n; i += w) {
      std::memcpy(&a, x + i, sizeof a);
      if (backward) std::memcpy(&b, dy + i, sizeof b);
      gelu<backward>(a, b);
      std::memcpy(out + i, &b, sizeof b);
    }
    if (i == n) return;
    a = F{}, b = F{};
    std::memcpy(&a, x + i, (n - i) * sizeof(float));
    if (backward) std::memcpy(&b, dy + i, (n - i) * sizeof(float));
    gelu<backward>(a, b);
    std::memcpy(out + i, &b, (n - i) * sizeof(float));
  }
};
typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
typedef float F4 __attribute__((vector_size(16)));
typedef int32_t I4 __attribute__((vector_size(16)));
template <bool grad>
__attribute__((target("avx512f"))) inline void run_avx512(const float* x, const float* dy, float* out, int64_t n) {
  Lanes<F16, I16>::map<grad>(x, dy, out, n);
}
template <bool grad>
__attribute__((target("avx2,fma"))) inline void run_avx2(const float* x, const float* dy, float* out, int64_t n) {
  Lanes<F8, I8>::map<grad>(x, dy, out, n);
}
template <bool grad>
inline void run_sse(const float* x, const float* dy, float* out, int64_t n) {
  Lanes<F4, I4>::map<grad>(x, dy, out, n);
}
#undef LIGHTRON_INLINE
// y = gelu(x) (dy undefined) or dx = dy · gelu'(x), over ATen's threads.
inline torch::Tensor apply(const torch::Tensor& x_in, const torch::Tensor& dy_in = {}) {
  using Run = void (*)(const float*, const float*, float*, int64_t);
  static const int isa = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const Run forward[] = {run_sse<false>, run_avx2<false>, run_avx512<false>};
  static const Run backward[] = {run_sse<true>, run_avx2<true>, run_avx512<true>};
  const auto x = x_in.contiguous(), dy = dy_in.defined() ? dy_in.contiguous() : dy_in;
  auto out = torch::empty_like(x);
  const float* X = x.data_ptr<float>();
  const float* DY = dy.defined() ? dy.data_ptr<float>() : nullptr;
  float* OUT = out.data_ptr<float>();
  const Run run = DY ? backward[isa] : forward[isa];
  at::parallel_for(0, x.numel(), /*grain_size=*/1 << 14,
                   [&](int64_t b, int64_t e) { run(X + b, DY ? DY + b : nullptr, OUT + b, e - b); });
  return out;
}
}  // namespace gelu_simd
#endif

}  // namespace lightron
