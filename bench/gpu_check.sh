#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU and a pip PyTorch 2.x (no apt, no internet),
# in one run of a few minutes:
#   1. configure and build lightron against the pip LibTorch (CUDA), header-only fmt/doctest/
#      CLI11/nlohmann brought along in $VENDOR (default .vendor/include);
#   2. run the test suite's single-rank tests, then the CUDA suite (CPU-vs-CUDA fp32 parity,
#      bf16 mixed precision); then the classroom on one GPU: the 2x2x2, tp 2, pp 2, dp 2, cp 2
#      and ZeRO-3 dp 2 layouts with all their ranks on the one GPU (collectives over Gloo through host
#      memory), each run's losses and gradient norms against one rank's, fp32 and bf16;
#   3. train GPT-2 124M (12 layers, hidden 768, 12 heads, vocab 50304, seq 1024) in bf16 and
#      print tokens/s and MFU against the GPU's dense bf16 peak (989 TFLOP/s, H100/H200 SXM);
#   4. run the same model in PyTorch-Python, eager (torch.optim's default AdamW, then fused
#      AdamW) and torch.compile, in the same invocation, and print the ratios;
#   5. export a lightron checkpoint to HuggingFace and compare logits with transformers.
# Writes a report to ${OUT:-bench/out}/gpu_report.md and ends with "status: PASS" or "FAIL".
# On an offline machine, bring the folder that bench/gpu_bundle.sh packs and run it there.
#
#   bash bench/gpu_check.sh                  # on the GPU machine
#   bash bench/gpu_check.sh --cpu-dry-run    # here: the same steps at toy size on the CPU,
#                                            # with the CPU build in ${BUILD:-build}
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
[ "${1:-}" = "--cpu-dry-run" ] && dry=1
out=${OUT:-bench/out}
mkdir -p "$out"
report="$out/gpu_report.md"
py=${PYTHON:-python3}  # the one with torch (the CPU dry run under ctest: /usr/bin/python3)
status=0
say() { echo "$*" | tee -a "$report"; }
: > "$report"
say "# lightron GPU check ($(date -u +%Y-%m-%dT%H:%MZ))$([ $dry = 1 ] && echo ' -- CPU dry run, toy sizes')"
say "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1 || echo none)"
say "torch: $($py -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"

targets="lightron_tests pretrain_gpt preprocess_data convert_checkpoint"
if [ $dry = 1 ]; then
  # Model flags shared by lightron and the PyTorch baseline (pretrain_gpt's names).
  build=${BUILD:-build}
  seq=64 mbs=4 peak=0.1  # TFLOP/s: one CPU thread's fp32 GEMM peak, as pretrain_gpt assumes
  model="--vocab-size 512 --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length $seq --micro-batch-size $mbs"
  device="--device cpu"
  unit_filter="--source-file=*test_gpt.cpp"  # a few test cases: the runner, not the suite
  iters=15
  for t in $targets; do
    [ -x "$build/tests/$t" ] || [ -x "$build/examples/$t" ] || { say "no $t in $build: build the CPU tree first"; exit 1; }
  done
else
  # 1. build
  build=build-gpu
  seq=1024 mbs=16 peak=989  # TFLOP/s: H100/H200 SXM dense bf16
  model="--vocab-size 50304 --num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length $seq --micro-batch-size $mbs"
  device="--device cuda"
  unit_filter=""
  iters=40
  vendor=${VENDOR:-$PWD/.vendor/include}
  prefix=$($py -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
  t0=$(date +%s)
  cmake -S . -B $build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
    -DLIGHTRON_VENDOR_INCLUDE="$vendor" -DTORCH_CUDA_ARCH_LIST=9.0 > "$out/configure.log" 2>&1 \
    || { say "configure FAILED"; tail -30 "$out/configure.log"; exit 1; }
  cmake --build $build -j 16 --target $targets > "$out/build.log" 2>&1 \
    || { say "build FAILED"; grep -E "error" -A3 "$out/build.log" | head -60; exit 1; }
  say "build: $(( $(date +%s) - t0 )) s ($targets)"
fi

# 2. tests
# Each single-rank test case in a process of its own, so that one crash names itself.
$py bench/run_test_cases.py $build/tests/lightron_tests "$out/unit_failed.log" \
  --test-suite-exclude='mpi*,reference*,cuda' $unit_filter | tee -a "$report"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
if $build/tests/lightron_tests --test-suite=cuda -s > "$out/cuda.log" 2>&1; then
  say "CUDA tests (CPU-vs-CUDA fp32 parity, bf16): $(grep -E 'test cases' "$out/cuda.log" | tail -1)"
else
  say "CUDA tests FAILED"; grep -E "ERROR|values|logged" "$out/cuda.log" | head -30; status=1
fi
grep -E "largest relative loss difference" "$out/cuda.log" | sed 's/.*MESSAGE: /  /' | tee -a "$report"

# 2b. The classroom on one GPU: every layout's ranks share the device (plan_device sees more
# ranks than GPUs and sends the collectives over Gloo through host memory; the CPU dry run
# asks for that with --through-host), and reproduce one rank's losses and gradient norms.
# fp32: 1e-5 relative, as the CPU parity tests. bf16: 2e-2, since products are rounded to 8
# significant bits (2^-8 = 3.9e-3 relative) and a layout rounds different partial sums.
launch() {  # N RUN_NAME COMMAND...: N ranks here; mpirun if there is one, else torchrun
  local n=$1 name=$2; shift 2
  if command -v mpirun > /dev/null; then
    mpirun -np "$n" --oversubscribe --allow-run-as-root --bind-to none -x OMP_NUM_THREADS=1 \
      -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT="$port" "$@" > "$out/$name.log" 2>&1
  else
    OMP_NUM_THREADS=1 $py -m torch.distributed.run --no-python --nproc_per_node "$n" \
      --master_addr 127.0.0.1 --master_port "$port" "$@" > "$out/$name.log" 2>&1
  fi
}
port=${MASTER_PORT:-29590}
classroom="--mock-data --vocab-size 512 --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64
  --micro-batch-size 2 --global-batch-size 8 --train-iters 8 --lr 1e-3 --log-interval 1 $device"
for precision in fp32 $([ $dry = 0 ] && echo bf16); do
  flags=$classroom
  [ $precision = bf16 ] && flags="$flags --bf16"
  [ $dry = 1 ] && flags="$flags --through-host"
  tolerance=$([ $precision = bf16 ] && echo 2e-2 || echo 1e-5)
  launch 1 "one_rank_$precision" $build/examples/pretrain_gpt $flags --metrics-file "$out/one_rank_$precision.jsonl"
  for layout in "8 2x2x2 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2" \
                "2 tp2 --tensor-model-parallel-size 2" "2 pp2 --pipeline-model-parallel-size 2" "2 dp2" \
                "2 cp2 --context-parallel-size 2" "2 zero3 --data-parallel-sharding-strategy optim_grads_params"; do
    read -r n name sizes <<< "$layout"
    run="${name}_$precision"
    launch "$n" "$run" $build/examples/pretrain_gpt $flags $sizes --metrics-file "$out/$run.jsonl"
    grep -q "through host memory" "$out/$run.log" || { say "$run: the collectives did not go through host memory"; status=1; }
    $py - "$out/one_rank_$precision.jsonl" "$out/$run.jsonl" "$tolerance" "$n ranks on one device, $name, $precision" \
        <<'EOF' | tee -a "$report"
import json, sys
def steps(path):
    try:
        return [json.loads(l) for l in open(path) if '"loss"' in l]
    except OSError:
        return []
ref, run, tolerance, what = steps(sys.argv[1]), steps(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
if not ref or len(run) != len(ref):
    sys.exit(print(f"{what}: FAILED, {len(run)} of {len(ref)} steps (see its .log)") or 1)
worst = max(abs(r[k] - o[k]) / abs(o[k]) for r, o in zip(run, ref) for k in ("loss", "grad_norm"))
print(f"{what}: {len(run)} steps, max relative difference (loss, grad norm) {worst:.1e} "
      f"{'<=' if worst <= tolerance else 'ABOVE'} {tolerance:g}")
sys.exit(worst > tolerance)
EOF
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
done

# 3. lightron, bf16 on the GPU (fp32 in the dry run)
$build/examples/pretrain_gpt --mock-data $model $device $([ $dry = 0 ] && echo --bf16) \
  --global-batch-size $mbs \
  --peak-tflops $peak --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 5 --clip-grad 1.0 --weight-decay 0.1 --log-interval 1 \
  --train-iters $iters --metrics-file "$out/lightron.jsonl" > "$out/lightron.log" 2>&1 \
  || { say "lightron run FAILED"; tail -5 "$out/lightron.log"; status=1; }
cpp=$($py - "$out/lightron.jsonl" $((mbs * seq)) <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l][10:]  # 10 warm-up steps
ms = sum(r["ms_per_iter"] for r in rows) / len(rows)
tps = int(sys.argv[2]) / (ms / 1000)
mfu = sum(r["mfu"] for r in rows) / len(rows)
print(json.dumps({"tokens_per_s": tps, "ms_per_iter": ms, "mfu": mfu, "loss": rows[-1]["loss"], "peak_mib": rows[-1]["peak_mib"]}))
EOF
) || status=1
say "lightron:                $cpp"

# 4. PyTorch baselines, same invocation, same model flags
baseline() {  # name, extra flags...
  local name=$1; shift
  timeout 240 $py bench/pytorch_gpu.py $model $device --peak-tflops $peak --iters $((iters - 10)) "$@" 2>"$out/$name.err" | tail -1
}
eager=$(baseline eager)
fused=$(baseline eager_fused --fused-adamw)
compiled=$(baseline compile --compile)
say "PyTorch eager:           ${eager:-did not run (see eager.err)}"
say "PyTorch eager fused:     ${fused:-did not run (see eager_fused.err)}"
say "PyTorch compile:         ${compiled:-did not run (see compile.err)}"
[ -n "$eager" ] || status=1
$py - "$cpp" "$eager" "$fused" "$compiled" <<'EOF' | tee -a "$report"
import json, sys
cpp = json.loads(sys.argv[1])
print(f"MFU lightron {100 * cpp['mfu']:.1f}%")
for name, line in zip(["eager (default AdamW)", "eager (fused AdamW)", "torch.compile"], sys.argv[2:]):
    if line:
        print(f"ratio lightron / PyTorch {name}, tokens/s: {cpp['tokens_per_s'] / json.loads(line)['tokens_per_s']:.3f}")
EOF
[ "${PIPESTATUS[0]}" = 0 ] || status=1

# 5. HuggingFace export, checked with transformers: the export (tp 2 x pp 2, from
#    tests/hf_check.py, which needs mpirun) is made here if possible, or brought along in
#    $HF_ARTIFACTS (default hf_artifacts/, as bench/gpu_bundle.sh packs it) without mpirun.
hf=${HF_ARTIFACTS:-}
[ -z "$hf" ] && [ -d hf_artifacts/hf_gpt2 ] && hf=$PWD/hf_artifacts
if ! $py -c 'import transformers' 2>/dev/null; then
  say "HuggingFace/transformers check: skipped (no transformers here)"
  [ $dry = 1 ] || status=1
else
  if [ -z "$hf" ] && command -v mpirun >/dev/null; then
    hf="$out/hf"; $py tests/hf_check.py --build $build --workdir "$hf" > "$out/hf_check.log" 2>&1 || hf=""
  fi
  if [ -n "$hf" ] && [ -d "$hf/hf_gpt2" ]; then
    $py tests/hf_transformers_check.py --workdir "$hf" 2>"$out/hf_transformers.err" | tee -a "$report"
    [ "${PIPESTATUS[0]}" = 0 ] || { status=1; tail -5 "$out/hf_transformers.err"; }
  else
    say "HuggingFace/transformers check FAILED: no export (set HF_ARTIFACTS or install mpirun)"; status=1
  fi
fi
say "status: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
