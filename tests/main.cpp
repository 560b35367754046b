// The doctest runner for lightron_tests. Multi-rank test suites run under mpirun and are
// selected with --test-suite (see tests/CMakeLists.txt).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
