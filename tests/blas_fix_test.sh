#!/usr/bin/env bash
# bash tests/blas_fix_test.sh BUILD_DIR
#
# blas.hpp's restart, end to end: pretrain_gpt told (LIGHTRON_TEST_BLAS_CORE) that OpenBLAS
# chose its Prescott kernels prints one note, restarts itself with a better OPENBLAS_CORETYPE
# and trains; with OPENBLAS_CORETYPE set by the user, or with --no-blas-fix, it says nothing
# and keeps the kernel. Skipped (77) on a CPU without AVX2 + FMA, where there is nothing better.
set -uo pipefail
build=${1:?usage: $0 BUILD_DIR}
program=("$build/examples/pretrain_gpt" --mock-data --vocab-size 128 --num-layers 1 --hidden-size 32
         --num-attention-heads 2 --seq-length 16 --micro-batch-size 2 --global-batch-size 2 --train-iters 2
         --log-interval 1)
grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo || { echo "skip: this CPU has no AVX2 + FMA"; exit 77; }
fail=0
out=$(env -u OPENBLAS_CORETYPE LIGHTRON_TEST_BLAS_CORE=Prescott "${program[@]}" 2>&1)
code=$?
notes=$(grep -c "^note: OpenBLAS chose its Prescott kernels" <<<"$out")
if [ $code -ne 0 ] || [ "$notes" -ne 1 ] || ! grep -Eq "iteration +2/ +2" <<<"$out"; then
  echo "FAIL  the old kernel was not replaced (exit $code, $notes note(s)):"; echo "$out" | tail -20; fail=1
else
  echo "ok    an old kernel: $(grep '^note:' <<<"$out")"
fi
for case in "OPENBLAS_CORETYPE=Prescott" "--no-blas-fix"; do
  if [ "$case" = "--no-blas-fix" ]; then
    out=$(env -u OPENBLAS_CORETYPE LIGHTRON_TEST_BLAS_CORE=Prescott "${program[@]}" --no-blas-fix 2>&1)
  else
    out=$(env OPENBLAS_CORETYPE=Prescott LIGHTRON_TEST_BLAS_CORE=Prescott "${program[@]}" 2>&1)
  fi
  code=$?
  if [ $code -ne 0 ] || grep -q "^note: OpenBLAS" <<<"$out"; then
    echo "FAIL  with $case the kernel must stay, silently (exit $code):"; echo "$out" | tail -20; fail=1
  else
    echo "ok    with $case: no restart"
  fi
done
exit $fail
