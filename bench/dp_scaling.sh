#!/usr/bin/env bash
# Data-parallel weak scaling on the "tiny" config (vocab 4096, 4 layers, hidden 256, 4 heads,
# seq 128, micro-batch 8): 1 rank x 1 thread vs 2 ranks x 1 thread, the same batch per rank.
# Efficiency = tokens/s of 2 ranks / (2 x tokens/s of 1 rank). Usage: bench/dp_scaling.sh [BUILD]
set -euo pipefail
build=${1:-build}
iters=${ITERS:-30}
warmup=5
out=$(mktemp -d)
flags="--mock-data --vocab-size 4096 --num-layers 4 --hidden-size 256 --num-attention-heads 4
  --seq-length 128 --micro-batch-size 8 --train-iters $iters --log-interval 1 --lr 1e-4 --num-threads 1"
run() {  # ranks
  mpirun -np "$1" --oversubscribe --allow-run-as-root --bind-to none -x OMP_NUM_THREADS=1 -x MASTER_PORT=29590 \
    "$build/examples/pretrain_gpt" $flags --global-batch-size $((8 * $1)) --metrics-file "$out/dp$1.jsonl" > "$out/dp$1.log"
}
run 1
run 2
/usr/bin/python3 - "$out" "$warmup" <<'PY'
import json, sys
out, warmup = sys.argv[1], int(sys.argv[2])
def tps(n):
    rows = [json.loads(l) for l in open(f"{out}/dp{n}.jsonl") if '"tokens_per_s"' in l][warmup:]
    ms = sum(r["ms_per_iter"] for r in rows) / len(rows)
    return 8 * n * 128 / (ms / 1000)
one, two = tps(1), tps(2)
print(f"dp weak scaling (tiny, 1 thread per rank): 1 rank {one:.0f} tokens/s, 2 ranks {two:.0f} tokens/s, "
      f"efficiency {100 * two / (2 * one):.1f}%")
PY
rm -rf "$out"
