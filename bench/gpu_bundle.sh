#!/usr/bin/env bash
# Packs what bench/gpu_check.sh needs on an offline GPU machine (pip PyTorch, no apt, no
# mpirun) into one folder: the committed sources (git archive HEAD), the header-only
# dependencies (fmt, doctest, CLI11, nlohmann-json) copied from this machine's include
# directory into .vendor/include, and a HuggingFace export made here (tests/hf_check.py: a
# tp 2 x pp 2 run under mpirun, then convert_checkpoint) in hf_artifacts/.
#
#   bash bench/gpu_bundle.sh [BUILD_DIR=build] [DEST=.gpucheck]
#   # then, on the GPU machine, inside DEST:  bash bench/gpu_check.sh
# gpu_check.sh finds .vendor/include and hf_artifacts/ by itself. Needs the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
dest=${2:-.gpucheck}
include=${INCLUDE_DIR:-/usr/include}
[ -x "$build/examples/convert_checkpoint" ] || { echo "gpu_bundle: no $build/examples/convert_checkpoint: build first (make build)" >&2; exit 1; }
rm -rf "$dest"
mkdir -p "$dest/.vendor/include"
git archive HEAD | tar -x -C "$dest"
for d in fmt doctest CLI nlohmann; do
  [ -d "$include/$d" ] || { echo "gpu_bundle: no $include/$d (scripts/install_deps.sh installs it)" >&2; exit 1; }
  cp -r "$include/$d" "$dest/.vendor/include/"
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
/usr/bin/python3 tests/hf_check.py --build "$build" --workdir "$work" --port 29985 > "$work.log" 2>&1 \
  || { echo "gpu_bundle: tests/hf_check.py failed, see $work.log" >&2; exit 1; }
mkdir -p "$dest/hf_artifacts"
cp -r "$work"/hf_gpt2 "$work"/hf_llama "$work"/logits_gpt2.safetensors "$work"/logits_llama.safetensors "$dest/hf_artifacts/"
rm -f "$work.log"
echo "gpu_bundle: $dest ($(du -sh "$dest" | cut -f1)) from $(git rev-parse --short HEAD)"
