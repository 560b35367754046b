#!/usr/bin/env bash
# bench/throughput.sh — single-process training throughput of lightron's C++ pretrain_gpt
# against the same GPT-2 model in PyTorch-Python (bench/pytorch_gpt.py), fp32, AdamW, random
# tokens, same thread count, plus the measured fp32 GEMM peak that MFU is taken against.
#
#   bash bench/throughput.sh [BUILD_DIR] [tiny|small|all]      # defaults: build all
#
# tiny: V 4096, L 4, C 256, H 4, T 128, B 8.  small (GPT-2 124M): V 50304, L 12, C 768,
# H 12, T 256, B 4. Takes ~3 minutes on 2 idle cores; run nothing else meanwhile.
# Environment: THREADS (2), WARMUP (untimed steps; 3 tiny, 2 small), ITERS_TINY (25),
# ITERS_SMALL (6), PYTHON (/usr/bin/python3). Logs and metrics go to BUILD_DIR/bench/.
# Python gets glibc malloc tunables (pretrain_gpt calls mallopt itself); OPENBLAS_* variables
# are left as they are, so both sides run under the same BLAS settings.
set -euo pipefail

build=${1:-build}
which=${2:-all}
threads=${THREADS:-2}
python=${PYTHON:-/usr/bin/python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
binary="$build/examples/pretrain_gpt"
out="$build/bench"
tuned_malloc=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184

case "$which" in
  tiny | small) configs=("$which") ;;
  all) configs=(tiny small) ;;
  *) echo "throughput.sh: unknown config '$which'; use tiny, small or all" >&2; exit 2 ;;
esac
#                 V     L  C   H  T   B  timed steps               untimed steps
declare -A shape=([tiny]="4096 4 256 4 128 8 ${ITERS_TINY:-25} ${WARMUP:-3}"
                  [small]="50304 12 768 12 256 4 ${ITERS_SMALL:-6} ${WARMUP:-2}")

mkdir -p "$out"
have_cpp=1
if [ ! -x "$binary" ]; then
  have_cpp=0
  echo "throughput.sh: $binary not found; build it with" \
       "\`cmake --build $build --target pretrain_gpt\`. Timing the Python side only." >&2
fi

echo "GEMM peak: fp32, $threads threads, 2048^3 ..."
GLIBC_TUNABLES=$tuned_malloc OMP_NUM_THREADS=$threads \
  "$python" "$here/gemm_peak.py" --threads "$threads" --size 2048 > "$out/gemm_peak.json"

for cfg in "${configs[@]}"; do
  read -r V L C H T B iters warmup <<< "${shape[$cfg]}"
  if [ "$have_cpp" = 1 ]; then
    echo "$cfg: lightron C++, $warmup + $iters steps ..."
    rm -f "$out/cpp_$cfg.jsonl"
    if ! OMP_NUM_THREADS=$threads "$binary" --mock-data --vocab-size "$V" --num-layers "$L" \
        --hidden-size "$C" --num-attention-heads "$H" --seq-length "$T" --micro-batch-size "$B" \
        --global-batch-size "$B" --train-iters $((warmup + iters)) --log-interval 1 --lr 1e-4 \
        --num-threads "$threads" --metrics-file "$out/cpp_$cfg.jsonl" > "$out/cpp_$cfg.log" 2>&1; then
      tail -n 20 "$out/cpp_$cfg.log" >&2
      echo "throughput.sh: pretrain_gpt failed; full log in $out/cpp_$cfg.log" >&2
      exit 1
    fi
  fi
  echo "$cfg: PyTorch-Python, $warmup + $iters steps ..."
  GLIBC_TUNABLES=$tuned_malloc OMP_NUM_THREADS=$threads "$python" "$here/pytorch_gpt.py" \
    --config "$cfg" --iters "$iters" --warmup "$warmup" --threads "$threads" > "$out/pytorch_$cfg.json"
done

# The table: tokens/s over the timed steps (B·T·steps / their total time), MFU = achieved
# model FLOP/s (6N + 12·L·C·T per token, N from the Python model) / measured GEMM peak.
# "best step" is the fastest timed step: on a shared machine it is the steadier number.
"$python" - "$out" "$have_cpp" "${configs[@]}" <<'EOF'
import json, sys
out, have_cpp, configs = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
peak = json.load(open(f"{out}/gemm_peak.json"))
peak_flops = peak["gflops"] * 1e9
print(f"\nGEMM peak: {peak['gflops']:.1f} GFLOP/s (fp32, {peak['threads']} threads, best of "
      f"{peak['repeats']} {peak['n']}^3 products; median {peak['gflops_median']:.1f}; "
      f"OpenBLAS kernel {peak.get('blas_core') or 'n/a'})")
print(f"{'config':<7} {'impl':<9} {'tokens/s':>10} {'ms/iter':>9} {'GFLOP/s':>9} {'MFU':>7}"
      f"   {'best step: tokens/s':>19} {'MFU':>7}")
for cfg in configs:
    py = json.loads(open(f"{out}/pytorch_{cfg}.json").read().strip().splitlines()[-1])
    fpt, warmup = py["flops_per_token"], py["warmup"]
    rows = {"pytorch": (py["tokens_per_iter"], py["ms_per_iter"], py["ms_per_iter_min"])}
    if have_cpp:
        lines = [json.loads(l) for l in open(f"{out}/cpp_{cfg}.jsonl") if l.strip()]
        timed = sorted(lines, key=lambda l: l["iteration"])[warmup:]
        if not timed:
            sys.exit(f"throughput.sh: {out}/cpp_{cfg}.jsonl has no line after the {warmup} warm-up steps")
        ms = sum(l["ms_per_iter"] for l in timed) / len(timed)
        best = min(l["ms_per_iter"] for l in timed)
        rows = {"lightron": (py["tokens_per_iter"], ms, best), **rows}
    for impl, (tokens, ms, best) in rows.items():
        tps, best_tps = tokens * 1000 / ms, tokens * 1000 / best
        print(f"{cfg:<7} {impl:<9} {tps:10.1f} {ms:9.1f} {tps * fpt / 1e9:9.1f} {100 * tps * fpt / peak_flops:6.1f}%"
              f"   {best_tps:19.1f} {100 * best_tps * fpt / peak_flops:6.1f}%")
    if have_cpp:
        (_, cpp_ms, cpp_best), (_, py_ms, py_best) = rows["lightron"], rows["pytorch"]
        print(f"{cfg:<7} C++/Python tokens/s ratio: {py_ms / cpp_ms:.2f} (best steps: {py_best / cpp_best:.2f})")
if not have_cpp:
    print("lightron C++: not measured (pretrain_gpt missing)")
    sys.exit(1)
EOF
