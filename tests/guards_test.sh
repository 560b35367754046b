#!/usr/bin/env bash
# guards_test.sh BUILD_DIR — the guards of a long run (guards.hpp), end to end with real ranks:
#   (a) a NaN planted in one rank's gradient (tp 2 x dp 2, and pp 2 x dp 2): one line, from that
#       rank, naming the parameter and the iteration; the last checkpoint stays the newest;
#   (b) the same NaN with --no-check-for-nan-in-loss-and-grad: training goes on, and every line
#       of the metrics file is still JSON (null where the number is NaN);
#   (c) a spike planted on one rank of two: skipped on both (the replicas' hashes agree every
#       iteration), counted in the metrics, training goes on;
#   (d) SIGTERM to ranks launched directly (as Slurm and torchrun deliver it) with
#       --exit-signal-handler: exit 0, a checkpoint at the interrupted iteration, and the resumed
#       run continues bit-exactly on the straight run's losses;
#   (e) SIGUSR1 to mpirun (which forwards it; SIGTERM it does not) likewise;
#   (f) --exit-interval and --exit-duration-in-mins: save and exit 0;
#   (g) what used to fail after training fails before step 1: --save not writable (everywhere,
#       or on one rank only: that rank speaks), a validation split smaller than one batch, a
#       missing tokenizer with --sample-tokens.
# Writes only into its own mktemp folder; ports are asked from the system. Exits 1 if any
# expectation failed.
set -u

build=$(cd "${1:?usage: guards_test.sh BUILD_DIR}" && pwd)
bin=$build/examples/pretrain_gpt
[[ -x $bin ]] || { echo "guards_test.sh: $bin is not built"; exit 2; }
work=$(mktemp -d /tmp/lightron_guards.XXXXXX)
trap 'rm -rf "$work"' EXIT
failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}
free_port() { /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mpi() {  # mpi NP ARGS...: pretrain_gpt under mpirun, LIGHTRON_TEST_FAULT passed on when set
  local np=$1
  shift
  timeout -k 5 120 mpirun -np "$np" --oversubscribe --allow-run-as-root --bind-to none -x MASTER_ADDR=127.0.0.1 \
    -x MASTER_PORT="$(free_port)" -x OMP_NUM_THREADS=1 ${LIGHTRON_TEST_FAULT:+-x LIGHTRON_TEST_FAULT} "$bin" "$@"
}
errors() { grep -c "error: " "$1"; }
latest() { /usr/bin/python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["iteration"])' "$1/latest.json"; }
all_json() {  # every line of the file parses as JSON
  /usr/bin/python3 -c 'import json, sys; [json.loads(l) for l in open(sys.argv[1])]' "$1" 2>/dev/null
}
flags=(--mock-data --vocab-size 64 --num-layers 2 --hidden-size 16 --num-attention-heads 2 --seq-length 8
  --micro-batch-size 1 --global-batch-size 4 --lr 1e-3 --min-lr 1e-4 --log-interval 1 --num-threads 1)

# ---- (a) a NaN in one rank's gradient ------------------------------------------------------------
for layout in "--tensor-model-parallel-size 2" "--pipeline-model-parallel-size 2"; do
  echo "== (a) NaN planted in rank 2's gradient at iteration 3, $layout (4 ranks)"
  dir=$work/nan_${layout##* }_${layout:2:4}
  mkdir -p "$dir"
  LIGHTRON_TEST_FAULT=nan@3:2 mpi 4 "${flags[@]}" $layout --train-iters 6 --save "$dir/ckpt" --save-interval 2 \
    >"$dir/out.txt" 2>&1
  rc=$?
  ((rc != 0 && rc != 124)) || fail "expected a non-zero exit of its own, got $rc"
  line=$(grep "error: " "$dir/out.txt")
  echo "   exit $rc: $line"
  [[ $(errors "$dir/out.txt") == 1 ]] || fail "expected exactly one error line, got $(errors "$dir/out.txt")"
  [[ $line == "[rank 2 |"*"error: iteration 3: non-finite value (NaN or inf) in the gradient of h."*"on rank 2;"* ]] ||
    fail "the line does not come from rank 2 or does not name the gradient and iteration 3"
  [[ -d $dir/ckpt/iter_0000003 ]] && fail "a checkpoint of iteration 3 was written"
  [[ $(latest "$dir/ckpt") == 2 ]] || fail "latest.json no longer says iteration 2"
  grep -Eq "terminate called|Exception raised from" "$dir/out.txt" && fail "a raw exception"
done

# ---- (b) the same NaN, with the check off ----------------------------------------------------------
echo "== (b) NaN planted with --no-check-for-nan-in-loss-and-grad (2 ranks): trains on, metrics stay JSON"
dir=$work/nan_off
mkdir -p "$dir"
LIGHTRON_TEST_FAULT=nan@2:0 mpi 2 "${flags[@]}" --train-iters 4 --no-check-for-nan-in-loss-and-grad \
  --metrics-file "$dir/metrics.jsonl" >"$dir/out.txt" 2>&1
rc=$?
echo "   exit $rc; metrics line 4: $(sed -n 4p "$dir/metrics.jsonl" | cut -c1-110)"
((rc == 0)) || fail "expected exit 0, got $rc"
all_json "$dir/metrics.jsonl" || fail "a metrics line is not JSON"
grep -q '"loss": null' "$dir/metrics.jsonl" || fail "no NaN loss was written as null"

# ---- (c) a spike on one rank -------------------------------------------------------------------------
echo "== (c) spike planted on rank 1 of 2 at iteration 10, --skip-spike-factor 3 --skip-spike-window 5"
dir=$work/spike
mkdir -p "$dir"
LIGHTRON_TEST_FAULT=spike@10:1 mpi 2 "${flags[@]}" --train-iters 14 --skip-spike-factor 3 --skip-spike-window 5 \
  --check-weight-hash-interval 1 --metrics-file "$dir/metrics.jsonl" >"$dir/out.txt" 2>&1
rc=$?
echo "   exit $rc: $(grep "skipped" "$dir/out.txt" | head -1)"
((rc == 0)) || fail "expected exit 0 (the replicas' hashes agree at every iteration), got $rc"
[[ $(grep -c "update skipped" "$dir/out.txt") == 1 ]] || fail "expected one skipped update"
grep -q "iteration 10: update skipped" "$dir/out.txt" || fail "iteration 10 was not the one skipped"
all_json "$dir/metrics.jsonl" || fail "a metrics line is not JSON"
tail -1 "$dir/metrics.jsonl" | grep -q '"iteration": 14,.*"skipped_iterations": 1}' ||
  fail "the metrics do not count one skipped iteration at the end"

# ---- (d) SIGTERM to ranks launched directly --------------------------------------------------------------
echo "== (d) SIGTERM to both ranks of a directly launched run with --exit-signal-handler; then resume"
dir=$work/sigterm
mkdir -p "$dir"
iters=400
direct() {  # direct NAME ARGS...: 2 ranks with torchrun's variables, in the background; pids in $pids
  local name=$1 port
  port=$(free_port)
  shift
  pids=()
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port OMP_NUM_THREADS=1 \
      timeout -k 5 120 "$bin" "${flags[@]}" --train-iters $iters --metrics-file "$dir/$name.jsonl" "$@" \
      >"$dir/$name.$r.txt" 2>&1 &
    pids+=($!)
  done
}
direct straight
wait "${pids[@]}"
direct cut --exit-signal-handler --save "$dir/ckpt"
for _ in $(seq 300); do grep -q "iteration *20/" "$dir/cut.0.txt" 2>/dev/null && break; sleep 0.1; done
# the pids are timeout's; the ranks are their children
kill -TERM $(pgrep -P "${pids[0]}") $(pgrep -P "${pids[1]}") 2>/dev/null
rcs=()
for p in "${pids[@]}"; do
  wait "$p"
  rcs+=($?)
done
line=$(grep "exiting at iteration" "$dir/cut.0.txt")
echo "   exits ${rcs[*]}: $line"
[[ ${rcs[*]} == "0 0" ]] || fail "expected both ranks to exit 0, got ${rcs[*]}"
at=$(sed -n 's/^exiting at iteration \([0-9]*\) of .*SIGTERM received.*/\1/p' "$dir/cut.0.txt")
if [[ -z $at ]]; then
  fail "no 'exiting at iteration N of $iters (SIGTERM received)' line"
else
  [[ $(latest "$dir/ckpt") == "$at" ]] || fail "the newest checkpoint is not iteration $at"
  direct resumed --load "$dir/ckpt"
  wait "${pids[@]}"
  same=$(/usr/bin/python3 - "$dir/straight.jsonl" "$dir/resumed.jsonl" "$at" "$iters" <<'EOF'
import json, sys
def losses(path):
    return {r["iteration"]: r["loss_hex"] for r in map(json.loads, open(path)) if "loss_hex" in r}
a, b, at, n = losses(sys.argv[1]), losses(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("yes" if all(a[i] == b.get(i) for i in range(at + 1, n + 1)) else "no")
EOF
)
  echo "   resumed at $at: losses of iterations $((at + 1))..$iters bit-identical to the straight run: $same"
  [[ $same == yes ]] || fail "the resumed run's losses differ from the straight run's"
fi

# ---- (e) SIGUSR1 to mpirun -------------------------------------------------------------------------------
echo "== (e) SIGUSR1 to mpirun (2 ranks) with --exit-signal-handler"
dir=$work/sigusr1
mkdir -p "$dir"
mpi 2 "${flags[@]}" --train-iters 100000 --exit-signal-handler --save "$dir/ckpt" >"$dir/out.txt" 2>&1 &
launcher=$!
for _ in $(seq 300); do grep -q "iteration *10/" "$dir/out.txt" 2>/dev/null && break; sleep 0.1; done
kill -USR1 $(pgrep -x mpirun -P "$launcher,$(pgrep -d, -P "$launcher")")  # below the subshell and timeout
wait "$launcher"
rc=$?
line=$(grep "exiting at iteration" "$dir/out.txt")
echo "   exit $rc: $line"
((rc == 0)) || fail "expected exit 0, got $rc"
at=$(sed -n 's/^exiting at iteration \([0-9]*\) of .*SIGUSR1 received.*/\1/p' "$dir/out.txt")
[[ -n $at && $(latest "$dir/ckpt") == "$at" ]] || fail "no checkpoint at the interrupted iteration"

# ---- (f) --exit-interval and --exit-duration-in-mins ----------------------------------------------------------
for exit_flag in "--exit-interval 7" "--exit-duration-in-mins 0.0001"; do
  echo "== (f) $exit_flag (one process)"
  dir=$work/exit_${exit_flag:7:4}
  mkdir -p "$dir"
  timeout -k 5 60 "$bin" "${flags[@]}" --train-iters 50 $exit_flag --save "$dir/ckpt" >"$dir/out.txt" 2>&1
  rc=$?
  line=$(grep "exiting at iteration" "$dir/out.txt")
  echo "   exit $rc: $line"
  ((rc == 0)) || fail "expected exit 0, got $rc"
  at=$(sed -n 's/^exiting at iteration \([0-9]*\) of 50 .*/\1/p' "$dir/out.txt")
  [[ -n $at && $(latest "$dir/ckpt") == "$at" ]] || fail "no checkpoint at the iteration it exited"
  [[ $exit_flag != --exit-interval* || $at == 7 ]] || fail "--exit-interval 7 exited at iteration $at"
done

# ---- (g) failures that used to come after training ------------------------------------------------------------
check_early() {  # check_early NAME EXPECTED_TEXT COMMAND...: exit 2, one line with the text, no iteration run
  local name=$1 text=$2
  shift 2
  "$@" >"$work/$name.out" 2>"$work/$name.err"
  local rc=$?
  echo "   $name: exit $rc: $(grep "error: " "$work/$name.err")"
  ((rc == 2)) || fail "$name: expected exit 2, got $rc"
  [[ $(grep -c "error: " "$work/$name.err") == 1 ]] || fail "$name: expected exactly one error line"
  grep -q -- "$text" "$work/$name.err" || fail "$name: the line does not say '$text'"
  grep -q "iteration " "$work/$name.out" && fail "$name: training started before the failure"
}
echo "== (g) failures before step 1"
touch "$work/a_file"
check_early save_unwritable "--save $work/a_file/ckpt: cannot write there" \
  timeout 60 "$bin" "${flags[@]}" --train-iters 5 --save "$work/a_file/ckpt"
mkdir -p "$work/one_rank/.write_check.rank1"  # only rank 1's test file cannot be created
check_early save_one_rank "rank 1 .*error: --save $work/one_rank: cannot write there" \
  mpi 2 "${flags[@]}" --train-iters 5 --save "$work/one_rank"
check_early small_validation "the validation split holds 2 samples, fewer than one global batch (4)" \
  timeout 60 "$bin" "${flags[@]}" --train-iters 5 --mock-samples 16 --eval-interval 2
check_early no_tokenizer "--sample-tokens 5: $work/missing.model: file not found" \
  timeout 60 "$bin" "${flags[@]}" --train-iters 5 --sample-tokens 5 --tokenizer-model "$work/missing.model"

if ((failures > 0)); then
  echo "guards_test.sh: $failures expectation(s) failed"
  exit 1
fi
echo "guards_test.sh: all guards behaved"
