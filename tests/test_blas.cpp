// blas.hpp: the decision to restart with another OpenBLAS kernel, from a stub kernel name
// and stub CPU features; an OPENBLAS_CORETYPE the user set is never overridden. (The restart
// itself is checked by tests/blas_fix_test.sh, CTest blas_fix.)
#include "testing.hpp"

#include <lightron/blas.hpp>

using namespace lightron;

TEST_CASE("blas: an old kernel on an AVX2 or AVX-512 CPU gets the right one; nothing else changes") {
  const CpuFeatures avx512{true, true, true}, avx2{true, true, false}, sse{false, false, false};
  CHECK(better_blas_core("Prescott", avx512, "") == "SkylakeX");
  CHECK(better_blas_core("prescott", avx2, "") == "Haswell");
  CHECK(better_blas_core("Core2", avx2, "") == "Haswell");
  CHECK(better_blas_core("Sandybridge", avx512, "") == "SkylakeX");
  CHECK(better_blas_core("Prescott", sse, "") == "");        // the CPU runs nothing better
  CHECK(better_blas_core("Haswell", avx512, "") == "");      // a good kernel stays (even below SkylakeX)
  CHECK(better_blas_core("Zen", avx2, "") == "");
  CHECK(better_blas_core("SkylakeX", avx512, "") == "");
  CHECK(better_blas_core("", avx512, "") == "");             // not OpenBLAS
  CHECK(better_blas_core("Prescott", avx512, "Prescott") == "");  // the user's choice wins
  CHECK(better_blas_core("Prescott", avx512, "Haswell") == "");
}
