#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU and a pip PyTorch 2.x (no apt, no internet),
# in one run of a few minutes:
#   1. configure and build lightron against the pip LibTorch (CUDA), header-only fmt/doctest/
#      CLI11/nlohmann brought along in $VENDOR (default .vendor/include);
#   2. run the test suite's single-rank tests, then the CUDA suite (CPU-vs-CUDA fp32 parity,
#      bf16 mixed precision);
#   3. train GPT-2 124M (12 layers, hidden 768, 12 heads, vocab 50304, seq 1024) in bf16 and
#      print tokens/s and MFU against the GPU's dense bf16 peak (989 TFLOP/s, H100/H200 SXM);
#   4. run the same model in PyTorch-Python, eager and torch.compile, in the same invocation,
#      and print the ratios;
#   5. if examples/convert_checkpoint exists: export a lightron checkpoint to HuggingFace and
#      compare logits with transformers.
# Writes a report to ${OUT:-bench/out}/gpu_report.md. Usage: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
report="$out/gpu_report.md"
vendor=${VENDOR:-$PWD/.vendor/include}
build=build-gpu
py=python3
status=0
say() { echo "$*" | tee -a "$report"; }
: > "$report"
say "# lightron GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
say "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
say "torch: $($py -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"

# 1. build
prefix=$($py -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
t0=$(date +%s)
cmake -S . -B $build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
  -DLIGHTRON_VENDOR_INCLUDE="$vendor" -DTORCH_CUDA_ARCH_LIST=9.0 > "$out/configure.log" 2>&1 \
  || { say "configure FAILED"; tail -30 "$out/configure.log"; exit 1; }
targets="lightron_tests pretrain_gpt preprocess_data"
[ -f examples/convert_checkpoint.cpp ] && targets="$targets convert_checkpoint"
cmake --build $build -j 16 --target $targets > "$out/build.log" 2>&1 \
  || { say "build FAILED"; grep -E "error" -A3 "$out/build.log" | head -60; exit 1; }
say "build: $(( $(date +%s) - t0 )) s ($targets)"

# 2. tests
# Each single-rank test case in a process of its own, so that one crash names itself.
$py bench/run_test_cases.py ./$build/tests/lightron_tests "$out/unit_failed.log" \
  --test-suite-exclude='mpi*,reference*,cuda' | tee -a "$report"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
if ./$build/tests/lightron_tests --test-suite=cuda -s > "$out/cuda.log" 2>&1; then
  say "CUDA tests (CPU-vs-CUDA fp32 parity, bf16): $(grep -E 'test cases' "$out/cuda.log" | tail -1)"
else
  say "CUDA tests FAILED"; grep -E "ERROR|values|logged" "$out/cuda.log" | head -30; status=1
fi
grep -E "largest relative loss difference" "$out/cuda.log" | sed 's/.*MESSAGE: /  /' | tee -a "$report"

# 3. lightron GPT-2 124M, bf16
common="--mock-data --vocab-size 50304 --num-layers 12 --hidden-size 768 --num-attention-heads 12
  --seq-length 1024 --micro-batch-size 16 --global-batch-size 16 --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 5
  --clip-grad 1.0 --weight-decay 0.1 --device cuda --bf16 --log-interval 1"
./$build/examples/pretrain_gpt $common --train-iters 40 --metrics-file "$out/lightron_124m.jsonl" > "$out/lightron_124m.log" 2>&1 \
  || { say "lightron 124M run FAILED"; tail -5 "$out/lightron_124m.log"; status=1; }
cpp=$($py - "$out/lightron_124m.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l][10:]  # 10 warm-up steps
ms = sum(r["ms_per_iter"] for r in rows) / len(rows)
tps = 16 * 1024 / (ms / 1000)
mfu = sum(r["mfu"] for r in rows) / len(rows)
print(json.dumps({"tokens_per_s": tps, "ms_per_iter": ms, "mfu": mfu, "loss": rows[-1]["loss"], "peak_mib": rows[-1]["peak_mib"]}))
EOF
)
say "lightron 124M bf16: $cpp"

# 4. PyTorch baselines, same invocation
eager=$($py bench/pytorch_gpu.py 2>"$out/eager.err" | tail -1)
say "PyTorch eager:      $eager"
compiled=$(timeout 240 $py bench/pytorch_gpu.py --compile 2>"$out/compile.err" | tail -1)
say "PyTorch compile:    ${compiled:-did not finish (see compile.err)}"
$py - "$cpp" "$eager" "$compiled" <<'EOF' | tee -a "$report"
import json, sys
cpp = json.loads(sys.argv[1]); eager = json.loads(sys.argv[2])
print(f"MFU lightron {100*cpp['mfu']:.1f}% | ratio lightron/eager tokens/s {cpp['tokens_per_s']/eager['tokens_per_s']:.3f}")
if sys.argv[3]:
    comp = json.loads(sys.argv[3])
    print(f"ratio lightron/torch.compile tokens/s {cpp['tokens_per_s']/comp['tokens_per_s']:.3f}")
EOF

# 5. HuggingFace export, checked with transformers: the export (tp 2 x pp 2, from
#    tests/hf_check.py, which needs mpirun) is made here if possible, or brought along in
#    $HF_ARTIFACTS when this machine has no mpirun.
hf=${HF_ARTIFACTS:-}
if [ -z "$hf" ] && command -v mpirun >/dev/null && [ -x $build/examples/convert_checkpoint ]; then
  hf="$out/hf"; $py tests/hf_check.py --build $build --workdir "$hf" > "$out/hf_check.log" 2>&1 || hf=""
fi
if [ -n "$hf" ] && [ -d "$hf/hf_gpt2" ]; then
  $py tests/hf_transformers_check.py --workdir "$hf" 2>"$out/hf_transformers.err" | tee -a "$report"
  [ "${PIPESTATUS[0]}" = 0 ] || { status=1; tail -5 "$out/hf_transformers.err"; }
else
  say "HuggingFace/transformers check: skipped (no export: set HF_ARTIFACTS or install mpirun)"
fi
say "status: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
