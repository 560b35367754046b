#!/usr/bin/env bash
# Data-parallel weak scaling on the "tiny" config (vocab 4096, 4 layers, hidden 256, 4 heads,
# seq 128, micro-batch 8): 1 rank x 1 thread vs 2 ranks x 1 thread, the same batch per rank.
# Efficiency = tokens/s of 2 ranks / (2 x tokens/s of 1 rank), per round of the two runs, then
# the median over ROUNDS (3) rounds. Usage: bench/dp_scaling.sh [BUILD]
# Each round also runs two independent 1-rank trainings at the same time (no communication):
# what the machine itself gives up when both cores are busy (on the 2-core test VM this varied
# from nothing to a step ~15% slower). The last line splits the efficiency into that part and
# data parallelism's own (2 ranks / the two independent runs together).
set -euo pipefail
build=${1:-build}
iters=${ITERS:-30}
rounds=${ROUNDS:-3}  # 1 rank, two lone ranks at once, then 2 ranks, this many times: medians over the rounds
warmup=5
out=$(mktemp -d)
flags="--mock-data --vocab-size 4096 --num-layers 4 --hidden-size 256 --num-attention-heads 4
  --seq-length 128 --micro-batch-size 8 --train-iters $iters --log-interval 1 --lr 1e-4 --num-threads 1"
run() {  # ranks round
  mpirun -np "$1" --oversubscribe --allow-run-as-root --bind-to none -x OMP_NUM_THREADS=1 -x MASTER_PORT=29590 \
    "$build/examples/pretrain_gpt" $flags --global-batch-size $((8 * $1)) --metrics-file "$out/dp$1_$2.jsonl" > "$out/dp$1.log"
}
alone() {  # name round: one rank without mpirun or a process group
  OMP_NUM_THREADS=1 "$build/examples/pretrain_gpt" $flags --global-batch-size 8 --metrics-file "$out/$1_$2.jsonl" \
    > "$out/$1.log"
}
for r in $(seq "$rounds"); do
  run 1 "$r"
  alone pairA "$r" & pair_pid=$!
  alone pairB "$r"
  wait "$pair_pid"
  run 2 "$r"
done
/usr/bin/python3 - "$out" "$warmup" "$rounds" <<'PY'
import json, statistics, sys
out, warmup, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def tps(name, n, r):  # the median step: a step slowed by something else on the machine does not count
    rows = [json.loads(l) for l in open(f"{out}/{name}_{r}.jsonl") if '"tokens_per_s"' in l][warmup:]
    return 8 * n * 128 / (statistics.median(row["ms_per_iter"] for row in rows) / 1000)
one = [tps("dp1", 1, r) for r in range(1, rounds + 1)]
two = [tps("dp2", 2, r) for r in range(1, rounds + 1)]
pair = [tps("pairA", 1, r) + tps("pairB", 1, r) for r in range(1, rounds + 1)]
eff = [100 * b / (2 * a) for a, b in zip(one, two)]
machine = [100 * p / (2 * a) for a, p in zip(one, pair)]
dp_own = [100 * b / p for b, p in zip(two, pair)]
print("rounds (1 rank, 2 ranks tokens/s, efficiency): " +
      "; ".join(f"{a:.0f}, {b:.0f}, {e:.1f}%" for a, b, e in zip(one, two, eff)))
print(f"dp weak scaling (tiny, 1 thread per rank, median of {rounds}): 1 rank {statistics.median(one):.0f} tokens/s, "
      f"2 ranks {statistics.median(two):.0f} tokens/s, efficiency {statistics.median(eff):.1f}% "
      f"(range {min(eff):.1f}-{max(eff):.1f}%)")
print(f"of which the machine (two independent 1-rank runs at once: {statistics.median(pair):.0f} tokens/s together, "
      f"{statistics.median(machine):.1f}% of twice one, range {min(machine):.1f}-{max(machine):.1f}%) and data "
      f"parallelism itself (2 ranks / those two: {statistics.median(dp_own):.1f}%, range {min(dp_own):.1f}-{max(dp_own):.1f}%)")
PY
rm -rf "$out"
