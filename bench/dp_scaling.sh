#!/usr/bin/env bash
# Data-parallel weak scaling on the "tiny" config (vocab 4096, 4 layers, hidden 256, 4 heads,
# seq 128, micro-batch 8): 1 rank x 1 thread vs 2 ranks x 1 thread, the same batch per rank,
# every rank pinned to a core of its own (CPUS, default "0 1"). Usage: bench/dp_scaling.sh [BUILD]
# Each round runs, one after another:
#   * one rank alone on the first core, then alone on the second. A VM's cores need not be
#     equally fast: on the 2-core test VM one core ran a training step 17% slower than the other
#     for minutes at a time, and an unpinned 1-rank run landed on either (rounds of 82% and 107%
#     in one invocation). Two synchronous ranks step at the pace of the slower core;
#   * two independent 1-rank trainings at once, one per core (no communication): what the
#     machine itself gives up when both cores are busy;
#   * 2 ranks, rank r on the r-th core.
# Efficiency = tokens/s of 2 ranks / (2 x tokens/s of 1 rank alone on the slower core), per round,
# then the median over ROUNDS (5). Also printed: the efficiency against the faster core, and the
# split into the machine's part (the slower of the two independent runs / the slower core alone)
# and data parallelism's own (2 ranks / twice that slower independent run).
set -euo pipefail
build=${1:-build}
iters=${ITERS:-25}
rounds=${ROUNDS:-5}
[[ "$rounds" =~ ^[1-9][0-9]*$ && "$iters" =~ ^[0-9]+$ && "$iters" -gt 5 ]] || {
  echo "error: ROUNDS must be at least 1 and ITERS more than 5 (the warm-up steps), got ROUNDS=$rounds ITERS=$iters" >&2; exit 2; }
read -r -a cpus <<< "${CPUS:-0 1}"
[ "${#cpus[@]}" -eq 2 ] || { echo "error: CPUS must name two cores, got '${CPUS:-}'" >&2; exit 2; }
for c in "${cpus[@]}"; do
  taskset -c "$c" true 2>/dev/null || { echo "error: CPUS: core $c is not available here (nproc $(nproc))" >&2; exit 2; }
done
warmup=5
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags="--mock-data --vocab-size 4096 --num-layers 4 --hidden-size 256 --num-attention-heads 4
  --seq-length 128 --micro-batch-size 8 --train-iters $iters --log-interval 1 --lr 1e-4 --num-threads 1"
alone() {  # core name round: one rank on that core, without mpirun or a process group
  OMP_NUM_THREADS=1 taskset -c "$1" "$build/examples/pretrain_gpt" $flags --global-batch-size 8 \
    --metrics-file "$out/$2_$3.jsonl" > "$out/$2.log"
}
for r in $(seq "$rounds"); do
  alone "${cpus[0]}" solo0 "$r"
  alone "${cpus[1]}" solo1 "$r"
  alone "${cpus[0]}" pair0 "$r" & pair_pid=$!
  alone "${cpus[1]}" pair1 "$r" || { wait "$pair_pid" || true; exit 1; }
  wait "$pair_pid"
  CPUS="${cpus[*]}" mpirun -np 2 --oversubscribe --allow-run-as-root --bind-to none -x OMP_NUM_THREADS=1 \
    -x MASTER_PORT=29590 -x CPUS bash -c 'c=($CPUS); exec taskset -c "${c[$OMPI_COMM_WORLD_RANK]}" "$@"' _ \
    "$build/examples/pretrain_gpt" $flags --global-batch-size 16 --metrics-file "$out/dp2_$r.jsonl" > "$out/dp2.log"
done
/usr/bin/python3 - "$out" "$warmup" "$rounds" <<'PY'
import json, statistics, sys
out, warmup, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def tps(name, n, r):  # the median step: a step slowed by something else on the machine does not count
    rows = [json.loads(l) for l in open(f"{out}/{name}_{r}.jsonl") if '"tokens_per_s"' in l][warmup:]
    return 8 * n * 128 / (statistics.median(row["ms_per_iter"] for row in rows) / 1000)
R = range(1, rounds + 1)
solo = [(tps("solo0", 1, r), tps("solo1", 1, r)) for r in R]
pair = [(tps("pair0", 1, r), tps("pair1", 1, r)) for r in R]
two = [tps("dp2", 2, r) for r in R]
slow = [min(s) for s in solo]
eff = [100 * b / (2 * a) for a, b in zip(slow, two)]
eff_fast = [100 * b / (2 * max(s)) for s, b in zip(solo, two)]
machine = [100 * min(p) / a for a, p in zip(slow, pair)]
dp_own = [100 * b / (2 * min(p)) for b, p in zip(two, pair)]
med = statistics.median
span = lambda v: f"{med(v):.1f}% (range {min(v):.1f}-{max(v):.1f}%)"
print("rounds (1 rank alone on each core, 2 ranks tokens/s, efficiency): " +
      "; ".join(f"{s[0]:.0f} / {s[1]:.0f}, {b:.0f}, {e:.1f}%" for s, b, e in zip(solo, two, eff)))
print(f"dp weak scaling (tiny, 1 thread per rank, median of {rounds}): 1 rank {med(slow):.0f} tokens/s on the slower "
      f"core, 2 ranks {med(two):.0f} tokens/s, efficiency {span(eff)}; against the faster core "
      f"({med(max(s) for s in solo):.0f} tokens/s): {span(eff_fast)}")
print(f"of which the machine (two independent 1-rank runs at once, the slower of them / the slower core alone: "
      f"{span(machine)}) and data parallelism itself (2 ranks / twice that slower independent run: {span(dp_own)})")
PY
