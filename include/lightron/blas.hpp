// lightron/blas.hpp — which BLAS kernel a CPU run uses, and a fix when it is the wrong one.
// Debian 12's OpenBLAS does not recognise some recent CPUs (an AVX-512 Xeon, for one) and
// falls back to its Prescott (SSE3) kernels: matrix products ~5x slower than the right
// kernel (NOTES.md). OpenBLAS reads OPENBLAS_CORETYPE only when it loads, so a program that
// wants another kernel sets the variable and starts itself again (execv keeps the process,
// its rank and its launcher). An OPENBLAS_CORETYPE the user set is never overridden, and
// --no-blas-fix keeps whatever OpenBLAS chose. Plumbing: skim it.
#pragma once

#include "core.hpp"

#include <dlfcn.h>   // dlsym: OpenBLAS's own report, when OpenBLAS is the loaded BLAS
#include <unistd.h>  // execv

#include <algorithm>
#include <cctype>
#include <string>

namespace lightron {

// What this CPU runs (x86 only; elsewhere nothing, and nothing is changed).
struct CpuFeatures {
  bool avx2 = false, fma = false, avx512f = false;
};
inline CpuFeatures cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.avx512f = __builtin_cpu_supports("avx512f");
#endif
  return f;
}

// The kernel OpenBLAS chose ("Haswell", "Prescott", ...), or "" when the BLAS is not
// OpenBLAS. LIGHTRON_TEST_BLAS_CORE stands in for it in the tests.
inline std::string blas_core_name() {
  if (const char* stub = std::getenv("LIGHTRON_TEST_BLAS_CORE")) return stub;
  using CoreName = char* (*)();
  auto fn = reinterpret_cast<CoreName>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  return fn ? std::string(fn()) : std::string();
}

// The OPENBLAS_CORETYPE to ask for, or "" to keep the chosen kernel: only when OpenBLAS fell
// back to a pre-AVX2 kernel on a CPU with AVX2 and FMA (Haswell's kernels) or AVX-512
// (SkylakeX's), and only when the user did not choose one (`explicit_coretype` non-empty).
inline std::string better_blas_core(const std::string& chosen, const CpuFeatures& cpu,
                                    const std::string& explicit_coretype) {
  if (!explicit_coretype.empty() || chosen.empty()) return "";
  std::string c = chosen;
  std::transform(c.begin(), c.end(), c.begin(), [](unsigned char ch) { return char(std::tolower(ch)); });
  static const char* kOld[] = {"unknown", "katmai", "coppermine", "northwood", "prescott", "banias", "atom",
                               "core2", "penryn", "dunnington", "nehalem", "athlon", "opteron",
                               "opteron_sse3", "barcelona", "nano", "bobcat", "sandybridge", "bulldozer",
                               "piledriver"};
  if (std::none_of(std::begin(kOld), std::end(kOld), [&](const char* old) { return c == old; })) return "";
  if (cpu.avx512f && cpu.avx2 && cpu.fma) return "SkylakeX";
  if (cpu.avx2 && cpu.fma) return "Haswell";
  return "";
}

// Restarts this program with a better kernel when better_blas_core finds one, after one line
// on stderr (rank 0 of a launch, or a lone process). Returns when there is nothing to do or
// the restart failed (then the line says what to set).
inline void fix_blas_kernel(char** argv) {
  const char* coretype = std::getenv("OPENBLAS_CORETYPE");
  const std::string chosen = blas_core_name();
  const std::string better = better_blas_core(chosen, cpu_features(), coretype ? coretype : "");
  if (better.empty()) return;
  bool rank0 = true;
  for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "RANK"})
    if (const char* v = std::getenv(var)) rank0 = rank0 && std::string(v) == "0";
  if (rank0)
    fmt::print(stderr, "note: OpenBLAS chose its {} kernels on a CPU that runs {}: restarting with "
               "OPENBLAS_CORETYPE={} (keep them: --no-blas-fix)\n", chosen, better, better);
  setenv("OPENBLAS_CORETYPE", better.c_str(), /*overwrite=*/1);
  unsetenv("LIGHTRON_TEST_BLAS_CORE");  // the restarted program asks OpenBLAS itself
  std::fflush(stderr);
  execv("/proc/self/exe", argv);
  if (rank0)
    fmt::print(stderr, "note: the restart failed; start the program with OPENBLAS_CORETYPE={} for "
               "faster matrix products\n", better);
}

}  // namespace lightron
