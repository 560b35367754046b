#!/usr/bin/env bash
# bench/throughput.sh — single-process training throughput of lightron's C++ pretrain_gpt
# against the same GPT-2 model in PyTorch-Python (bench/pytorch_gpt.py), fp32, AdamW, random
# tokens, same thread count, plus the measured fp32 GEMM peak that MFU is taken against (before
# every round and after the last: each round against the higher of its two).
#
#   bash bench/throughput.sh [BUILD_DIR] [tiny|small|all]      # defaults: build all
#
# tiny: V 4096, L 4, C 256, H 4, T 128, B 8.  small (GPT-2 124M): V 50304, L 12, C 768,
# H 12, T 256, B 4. The two sides run at the same time and take turns, one step each (two
# FIFOs: LIGHTRON_BENCH_TURNS in pretrain_gpt, --turns in pytorch_gpt.py), so that a machine
# whose speed drifts slows both alike (on the test machine one program's median step moved by
# up to 10% between runs minutes apart). Each run counts its median step; a round is one such
# pair of runs, and the table gives the median over the rounds and the range. About 3 minutes
# per round for both configs on 2 idle cores; run nothing else meanwhile.
# Environment: ROUNDS (3), THREADS (2), WARMUP (untimed steps; 6 tiny, 4 small), ITERS_TINY
# (25), ITERS_SMALL (8), PYTHON (/usr/bin/python3). Logs and metrics go to BUILD_DIR/bench/.
# The warm-up covers the slower side's: PyTorch-Python's first steps stay slow for longer
# (one run each: tiny 575, 385, 273, 233, 265, 262, then about 235 ms; small 11.0, 9.0, 7.0,
# 6.3, then 5.5-6.5 s), lightron's only its first. Per-step times: BUILD_DIR/bench/cpp_*.jsonl
# (ms_per_iter) and pytorch_*.json (ms_per_step).
# Python gets glibc malloc tunables (pretrain_gpt calls mallopt itself); OPENBLAS_* variables
# are left as they are, so both sides run under the same BLAS settings.
set -euo pipefail

build=${1:-build}
which=${2:-all}
threads=${THREADS:-2}
rounds=${ROUNDS:-3}
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
declare -A shape=([tiny]="4096 4 256 4 128 8 ${ITERS_TINY:-25} ${WARMUP:-6}"
                  [small]="50304 12 768 12 256 4 ${ITERS_SMALL:-8} ${WARMUP:-4}")

mkdir -p "$out"
have_cpp=1
if [ ! -x "$binary" ]; then
  have_cpp=0
  echo "throughput.sh: $binary not found; build it with" \
       "\`cmake --build $build --target pretrain_gpt\`. Timing the Python side only." >&2
fi

# The GEMM peak is measured before every round and once after the last: the machine's speed
# drifts, so each round's MFU is taken against the higher of the two peaks around it.
gemm_peak() {
  echo "GEMM peak: fp32, $threads threads, 2048^3 ..."
  GLIBC_TUNABLES=$tuned_malloc OMP_NUM_THREADS=$threads \
    "$python" "$here/gemm_peak.py" --threads "$threads" --size 2048 > "$out/gemm_peak_$1.json"
}

for round in $(seq 1 "$rounds"); do
  gemm_peak "$round"
  for cfg in "${configs[@]}"; do
    read -r V L C H T B iters warmup <<< "${shape[$cfg]}"
    py_json="$out/pytorch_${cfg}_$round.json"
    if [ "$have_cpp" = 0 ]; then
      echo "round $round, $cfg: PyTorch-Python, $warmup + $iters steps ..."
      GLIBC_TUNABLES=$tuned_malloc OMP_NUM_THREADS=$threads "$python" "$here/pytorch_gpt.py" \
        --config "$cfg" --iters "$iters" --warmup "$warmup" --threads "$threads" > "$py_json"
      continue
    fi
    echo "round $round, $cfg: lightron C++ and PyTorch-Python taking turns, $warmup + $iters steps each ..."
    rm -f "$out/cpp_${cfg}_$round.jsonl"
    turns=$(mktemp -d "$out/turns.XXXXXX")
    mkfifo "$turns/to_cpp" "$turns/to_python"
    OMP_NUM_THREADS=$threads LIGHTRON_BENCH_TURNS="$turns/to_cpp:$turns/to_python" "$binary" --mock-data \
      --vocab-size "$V" --num-layers "$L" --hidden-size "$C" --num-attention-heads "$H" --seq-length "$T" \
      --micro-batch-size "$B" --global-batch-size "$B" --train-iters $((warmup + iters)) --log-interval 1 \
      --lr 1e-4 --num-threads "$threads" --metrics-file "$out/cpp_${cfg}_$round.jsonl" > "$out/cpp_$cfg.log" 2>&1 &
    cpp_pid=$!
    GLIBC_TUNABLES=$tuned_malloc OMP_NUM_THREADS=$threads "$python" "$here/pytorch_gpt.py" --config "$cfg" \
      --iters "$iters" --warmup "$warmup" --threads "$threads" --turns "$turns/to_python:$turns/to_cpp" \
      > "$py_json" 2> "$out/pytorch_$cfg.log" &
    py_pid=$!
    # whichever ends first: when it failed, the other would wait for it forever
    first_status=0
    wait -n -p first "$cpp_pid" "$py_pid" || first_status=$?
    if [ "$first" = "$cpp_pid" ]; then other=$py_pid; else other=$cpp_pid; fi
    [ "$first_status" = 0 ] || kill "$other" 2> /dev/null || true
    other_status=0
    wait "$other" || other_status=$?
    rm -rf "$turns"
    if [ "$first_status" != 0 ] || [ "$other_status" != 0 ]; then
      tail -n 20 "$out/cpp_$cfg.log" "$out/pytorch_$cfg.log" >&2
      echo "throughput.sh: a run failed; logs in $out/cpp_$cfg.log and $out/pytorch_$cfg.log" >&2
      exit 1
    fi
  done
done
gemm_peak $((rounds + 1))

# The table: tokens/s from each run's median step (B·T / its time), the median over the rounds
# and their range; MFU = achieved model FLOP/s (6N + 12·L·C·T per token, N from the Python
# model) / measured GEMM peak; the ratio C++/Python per round (the two runs of one round took
# turns step by step) and its median.
"$python" - "$out" "$have_cpp" "$rounds" "${configs[@]}" <<'EOF'
import json, statistics, sys
out, have_cpp, rounds, configs = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4:]
peaks = [json.load(open(f"{out}/gemm_peak_{r}.json")) for r in range(1, rounds + 2)]
# round r ran between peak measurements r and r + 1: its MFU is against the higher
round_peak = [1e9 * max(peaks[r]["gflops"], peaks[r + 1]["gflops"]) for r in range(rounds)]
p0, best, medians = peaks[0], [p["gflops"] for p in peaks], [p["gflops_median"] for p in peaks]
print(f"\nGEMM peak: {' / '.join(f'{g:.1f}' for g in best)} GFLOP/s before each round and after the last "
      f"(fp32, {p0['threads']} threads, best of {p0['repeats']} {p0['n']}^3 products each; their medians "
      f"{' / '.join(f'{g:.1f}' for g in medians)}; OpenBLAS kernel {p0.get('blas_core') or 'n/a'})")
print(f"{rounds} round(s); tokens/s of each run's median step, and MFU against the higher GEMM peak "
      "measured around its round: the median over the rounds (range)")
print(f"{'config':<7} {'impl':<9} {'tokens/s':>10} {'(range)':>21} {'MFU':>7} {'(range)':>15}")


def cpp_median_ms(cfg, r, warmup):
    lines = [json.loads(l) for l in open(f"{out}/cpp_{cfg}_{r}.jsonl") if l.strip()]
    timed = sorted(lines, key=lambda l: l["iteration"])[warmup:]
    if not timed:
        sys.exit(f"throughput.sh: {out}/cpp_{cfg}_{r}.jsonl has no line after the {warmup} warm-up steps")
    return statistics.median([l["ms_per_iter"] for l in timed])  # as pytorch_gpt.py's ms_per_iter_median


for cfg in configs:
    py = [json.loads(open(f"{out}/pytorch_{cfg}_{r}.json").read().strip().splitlines()[-1])
          for r in range(1, rounds + 1)]
    fpt, tokens, warmup = py[0]["flops_per_token"], py[0]["tokens_per_iter"], py[0]["warmup"]
    runs = {"pytorch": [tokens * 1000 / p["ms_per_iter_median"] for p in py]}
    if have_cpp:
        runs = {"lightron": [tokens * 1000 / cpp_median_ms(cfg, r, warmup) for r in range(1, rounds + 1)], **runs}
    for impl, tps in runs.items():
        m = statistics.median(tps)
        mfu = [100 * t * fpt / pk for t, pk in zip(tps, round_peak)]
        span, mfu_span = f"({min(tps):.1f}-{max(tps):.1f})", f"({min(mfu):.1f}-{max(mfu):.1f})"
        print(f"{cfg:<7} {impl:<9} {m:10.1f} {span:>21} {statistics.median(mfu):6.1f}% {mfu_span:>15}")
    if have_cpp:
        ratios = [c / p for c, p in zip(runs["lightron"], runs["pytorch"])]
        print(f"{cfg:<7} C++/Python tokens/s ratio per round: {' / '.join(f'{x:.2f}' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f}")
if not have_cpp:
    print("lightron C++: not measured (pretrain_gpt missing)")
    sys.exit(1)
EOF
