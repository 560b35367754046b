#!/usr/bin/env bash
# consumer_test.sh SOURCE_DIR BUILD_DIR — lightron used by another CMake project, both ways:
#   (a) configure lightron alone (no tests, no examples), `cmake --install` it into a prefix,
#       build tests/consumer against it with find_package(lightron CONFIG REQUIRED), run it;
#       the consumer must see the installed headers, not the source tree's;
#   (b) build tests/consumer with add_subdirectory(SOURCE_DIR) and run it.
# BUILD_DIR is emptied first. Prints each step; exits non-zero at the first that fails.
set -euo pipefail

src=$(cd "${1:?usage: consumer_test.sh SOURCE_DIR BUILD_DIR}" && pwd)
work=${2:?usage: consumer_test.sh SOURCE_DIR BUILD_DIR}
rm -rf "$work"
mkdir -p "$work"
work=$(cd "$work" && pwd)
prefix=$work/prefix

step() {
  echo "+ $*"
  "$@" >"$work/step.log" 2>&1 || { cat "$work/step.log"; echo "FAIL: $*"; exit 1; }
}
run_consumer() {  # BUILD: runs the consumer and checks what it printed
  local out
  out=$("$1/consumer") || { echo "$out"; echo "FAIL: $1/consumer exited non-zero"; exit 1; }
  echo "$out"
  [[ $out == *"logits (2, 8, 128)"* ]] || { echo "FAIL: $1/consumer printed the wrong shape"; exit 1; }
}

echo "== (a) cmake --install, then find_package(lightron CONFIG REQUIRED)"
step cmake -S "$src" -B "$work/lightron" -DLIGHTRON_BUILD_TESTS=OFF -DLIGHTRON_BUILD_EXAMPLES=OFF \
  -DCMAKE_INSTALL_PREFIX="$prefix"
step cmake --install "$work/lightron"  # header-only: nothing to build first
step cmake -S "$src/tests/consumer" -B "$work/find_package" -DCMAKE_PREFIX_PATH="$prefix"
if grep -rq -- "$src/include" "$work/find_package/CMakeFiles"; then
  echo "FAIL: the installed lightron points back at the source tree ($src/include)"
  exit 1
fi
step cmake --build "$work/find_package" -j1
run_consumer "$work/find_package"

echo "== (b) add_subdirectory(SOURCE_DIR)"
step cmake -S "$src/tests/consumer" -B "$work/add_subdirectory" -DLIGHTRON_CONSUMER_ADD_SUBDIRECTORY=ON \
  -DLIGHTRON_SOURCE_DIR="$src"
step cmake --build "$work/add_subdirectory" -j1
run_consumer "$work/add_subdirectory"
echo "consumer_test.sh: both ways built and ran"
