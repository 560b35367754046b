#!/usr/bin/env bash
# bash tests/break_it_test.sh BUG NP TEST_CASE MPIRUN PORT TESTS_BINARY
#
# A "break it" exercise, checked: with LIGHTRON_BREAK=BUG (core.hpp's planted_bug) the parity
# test case TEST_CASE must fail under mpirun -np NP and say where the runs first differ
# ("differs: step ..."); it passes without the bug (the ordinary suites check that). Prints
# the parity line a student sees. Exit 0 when the planted bug was caught, 1 otherwise.
set -uo pipefail
if [ $# -ne 6 ]; then
  echo "usage: $0 BUG NP TEST_CASE MPIRUN PORT TESTS_BINARY" >&2
  exit 2
fi
bug=$1 np=$2 test_case=$3 mpirun=$4 port=$5 binary=$6
out=$("$mpirun" -np "$np" --oversubscribe --allow-run-as-root --bind-to none -x MASTER_ADDR=127.0.0.1 \
      -x MASTER_PORT="$port" -x OMP_NUM_THREADS=1 -x LIGHTRON_BREAK="$bug" \
      "$binary" --test-case="$test_case" 2>&1)
code=$?
caught=$(grep -m1 -o "differs: .*" <<<"$out")
if [ "$code" -ne 0 ] && [ -n "$caught" ]; then
  echo "caught LIGHTRON_BREAK=$bug in '$test_case' (exit $code): $caught"
  exit 0
fi
echo "$out" | tail -40
echo "FAIL  LIGHTRON_BREAK=$bug: '$test_case' did not report a parity difference (exit $code)"
exit 1
