#!/usr/bin/env bash
# failure_test.sh BUILD_DIR — what a user sees when a distributed run goes wrong, under a
# real mpirun: every scenario must end quickly, exit non-zero and name the rank at fault.
#   (a) dead rank:      kill -9 one rank of a 4-rank training run;
#   (b) missing rank:   a rank 0 of 2 whose peer never starts;
#   (c) stuck rank:     kill -STOP one rank; the others must time out and name it;
#   (d) dead rank without mpirun (which otherwise kills the job before our message is out):
#       our collectives wrapper must name the lost rank, and no other.
# Prints what each scenario saw; exits 1 if any expectation failed.
set -u

build=$(cd "${1:?usage: failure_test.sh BUILD_DIR}" && pwd)
bin=$build/examples/pretrain_gpt
[[ -x $bin ]] || { echo "failure_test.sh: $bin is not built"; exit 2; }

work=$(mktemp -d /tmp/lightron_failure.XXXXXX)
launched=()  # pids of the mpirun (timeout) processes this script started
failures=0

cleanup() {
  local f p
  for f in "$work"/*/pid.*; do
    [[ -f $f ]] && kill -9 "$(cat "$f")" 2>/dev/null
  done
  for p in "${launched[@]}"; do kill -9 "$p" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A tiny model that would train for hours: only a failure ends it.
flags=(--mock-data --vocab-size 64 --num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 8
  --micro-batch-size 1 --global-batch-size 4 --train-iters 1000000 --lr 1e-3 --min-lr 1e-4 --log-interval 50
  --num-threads 1)

fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}
now() { date +%s.%N; }
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# A process that exists and is not a zombie.
alive() { ps -o stat= -p "$1" 2>/dev/null | grep -qv Z; }
# wait_until SECONDS COMMAND...: polls COMMAND every 0.1 s; false if it never succeeded.
wait_until() {
  local deadline=$(($(date +%s) + $1))
  shift
  until "$@"; do
    (($(date +%s) >= deadline)) && return 1
    sleep 0.1
  done
}
training_started() { grep -q "iteration" "$1/out.txt" && [[ -f $1/pid.0 && -f $1/pid.1 && -f $1/pid.2 && -f $1/pid.3 ]]; }
# wrong_rank_named DIR RANK: our "lost rank(s) ..." lines may name RANK and no other.
wrong_rank_named() {
  local wrong
  wrong=$(grep -o "lost rank[^;]*" "$1/out.txt" | grep -v "^lost rank(s) $2 (no heartbeat")
  [[ -z $wrong ]] || fail "a wrong rank is named: $wrong"
}
# The output, without the training log.
show() { grep -v "^ iteration" "$1/out.txt" | sed 's/^/    | /'; }

# start_ranks DIR PORT TIMEOUT: 4 ranks under mpirun in the background; each writes its pid
# to DIR/pid.RANK before it becomes pretrain_gpt. Sets $mpirun_pid.
start_ranks() {
  local dir=$1 port=$2 timeout_s=$3
  mkdir -p "$dir"
  timeout -k 5 120 mpirun -np 4 --oversubscribe --allow-run-as-root --bind-to none \
    -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT="$port" -x OMP_NUM_THREADS=1 \
    sh -c "echo \$\$ > $dir/pid.\$OMPI_COMM_WORLD_RANK; exec $bin ${flags[*]} --distributed-timeout-seconds $timeout_s" \
    >"$dir/out.txt" 2>&1 &
  mpirun_pid=$!
  launched+=("$mpirun_pid")
  if ! wait_until 60 training_started "$dir"; then
    fail "$(basename "$dir"): training did not start within 60 s"
    show "$dir"
    return 1
  fi
}

# ---- (a) a rank dies ----------------------------------------------------------------------
echo "== (a) dead rank: kill -9 rank 2 of 4 (--distributed-timeout-seconds 20)"
dir=$work/dead
if start_ranks "$dir" 29960 20; then
  victim=$(cat "$dir/pid.2")
  kill -9 "$victim"
  start=$(now)
  wait_until 30 bash -c "! kill -0 $mpirun_pid 2>/dev/null" || fail "mpirun still running 30 s after the kill"
  wait "$mpirun_pid"
  rc=$?
  echo "   mpirun exited $rc after $(seconds_since "$start") s"
  ((rc != 0)) || fail "mpirun exited 0 after a rank was killed"
  ((rc != 124)) || fail "mpirun had to be stopped by timeout"  # 137 is mpirun's own: a rank got signal 9
  for r in 0 1 2 3; do
    alive "$(cat "$dir/pid.$r")" && fail "rank $r (pid $(cat "$dir/pid.$r")) is still running"
  done
  grep -Eq "rank 2[^0-9]|rank\(s\) 2[^0-9]" "$dir/out.txt" || fail "no line names the lost rank 2"
  wrong_rank_named "$dir" 2
  grep -Eq "terminate called|Exception raised from|frame #" "$dir/out.txt" && fail "a raw exception or stack trace"
  show "$dir"
fi

# ---- (b) a rank never arrives ---------------------------------------------------------------
echo "== (b) a rank that never arrives: rank 0 of 2 alone (--distributed-timeout-seconds 3)"
dir=$work/missing
mkdir -p "$dir"
start=$(now)
OMPI_COMM_WORLD_RANK=0 OMPI_COMM_WORLD_SIZE=2 OMPI_COMM_WORLD_LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29961 \
  timeout -k 5 30 "$bin" "${flags[@]}" --distributed-timeout-seconds 3 >"$dir/out.txt" 2>&1
rc=$?
elapsed=$(seconds_since "$start")
echo "   exited $rc after $elapsed s"
((rc != 0 && rc != 124 && rc != 137)) || fail "expected a non-zero exit of its own, got $rc"
awk -v e="$elapsed" 'BEGIN { exit !(e <= 10) }' || fail "took $elapsed s, more than 10 s"
grep -q "rank(s) 1 of 2 never arrived" "$dir/out.txt" || fail "no line says 'rank(s) 1 of 2 never arrived'"
grep -Eq "terminate called|Exception raised from|frame #" "$dir/out.txt" && fail "a raw exception or stack trace"
show "$dir"

# ---- (c) a rank is stuck --------------------------------------------------------------------
echo "== (c) stuck rank: kill -STOP rank 1 of 4 (--distributed-timeout-seconds 5)"
dir=$work/stuck
if start_ranks "$dir" 29962 5; then
  stuck=$(cat "$dir/pid.1")
  kill -STOP "$stuck"
  start=$(now)
  others_gone() { ! alive "$(cat "$dir/pid.0")" && ! alive "$(cat "$dir/pid.2")" && ! alive "$(cat "$dir/pid.3")"; }
  wait_until 30 others_gone || fail "ranks 0, 2, 3 still running 30 s after rank 1 stopped"
  echo "   ranks 0, 2, 3 gone after $(seconds_since "$start") s"
  kill -9 "$stuck" 2>/dev/null
  wait_until 10 bash -c "! kill -0 $mpirun_pid 2>/dev/null" || fail "mpirun still running after rank 1 was killed"
  wait "$mpirun_pid"
  rc=$?
  echo "   mpirun exited $rc after $(seconds_since "$start") s"
  ((rc != 0 && rc != 124 && rc != 137)) || fail "expected mpirun to exit non-zero on its own, got $rc"
  alive "$stuck" && fail "the stopped rank 1 (pid $stuck) is still there"
  grep -Eq "error: [a-z_]+ on the [a-z]+ group .*failed: .*rank\(s\) 1[^0-9]" "$dir/out.txt" ||
    fail "no line names the failed operation and the stuck rank 1"
  wrong_rank_named "$dir" 1
  grep -Eq "terminate called|Exception raised from|frame #" "$dir/out.txt" && fail "a raw exception or stack trace"
  show "$dir"
fi

# ---- (d) a rank dies, and no launcher cleans up ----------------------------------------------
echo "== (d) dead rank without mpirun: kill -9 rank 2 of 4 started directly (--distributed-timeout-seconds 20)"
dir=$work/dead_direct
mkdir -p "$dir"
declare -A waiter
for r in 0 1 2 3; do
  OMPI_COMM_WORLD_RANK=$r OMPI_COMM_WORLD_SIZE=4 OMPI_COMM_WORLD_LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 \
    MASTER_PORT=29963 OMP_NUM_THREADS=1 timeout -k 5 120 \
    sh -c "echo \$\$ > $dir/pid.$r; exec $bin ${flags[*]} --distributed-timeout-seconds 20" >"$dir/out.$r" 2>&1 &
  waiter[$r]=$!
  launched+=("$!")
done
if wait_until 60 bash -c "grep -q iteration $dir/out.0 && ls $dir/pid.3 >/dev/null 2>&1"; then
  kill -9 "$(cat "$dir/pid.2")"
  start=$(now)
  { wait "${waiter[2]}"; } 2>/dev/null  # without bash's "Killed" job notice
  others_gone() { ! alive "$(cat "$dir/pid.0")" && ! alive "$(cat "$dir/pid.1")" && ! alive "$(cat "$dir/pid.3")"; }
  wait_until 30 others_gone || fail "ranks 0, 1, 3 still running 30 s after rank 2 was killed"
  echo "   ranks 0, 1, 3 gone after $(seconds_since "$start") s"
  for r in 0 1 3; do
    wait "${waiter[$r]}"
    rc=$?
    ((rc != 0 && rc != 124 && rc != 137)) || fail "rank $r: expected an exit of its own, non-zero, got $rc"
    grep -q "error: " "$dir/out.$r" || fail "rank $r printed no error line"
  done
  grep -q "lost rank(s) 2 (no heartbeat" "$dir/out.0" || fail "rank 0 (which hosts the store) does not name rank 2"
  cat "$dir"/out.[0-3] >"$dir/out.txt"
  wrong_rank_named "$dir" 2
  grep -Eq "terminate called|Exception raised from|frame #" "$dir/out.txt" && fail "a raw exception or stack trace"
  grep "error: " "$dir/out.txt" | sed 's/^/    | /'
else
  fail "dead_direct: training did not start within 60 s"
  cat "$dir"/out.[0-3]
fi

if ((failures > 0)); then
  echo "failure_test.sh: $failures expectation(s) failed"
  exit 1
fi
echo "failure_test.sh: all scenarios behaved"
