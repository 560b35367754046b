#!/usr/bin/env bash
# failure_test.sh BUILD_DIR — what a user sees when a distributed run goes wrong. Every
# scenario must end soon (the timeout plus a few seconds), exit non-zero, give one line per
# rank that speaks, name the rank at fault, and show no library's raw text:
#   (a) dead rank:     kill -9 one rank of 4 under mpirun;
#   (b) missing rank:  a rank 0 of 2 whose peer never starts;
#   (c) stopped rank:  kill -STOP a middle rank, or rank 0 (which hosts the store), under mpirun
#       and launched directly, for good or resumed (SIGCONT) after the others gave up: they
#       name it, and a resumed rank says that it was stopped;
#   (d) dead rank without mpirun (which otherwise kills the job before our message is out):
#       our collectives wrapper must name the lost rank, and no other;
#   (e) a MASTER_PORT held by a program that accepts connections and never answers;
#   (f) the launcher dies (kill -9 of mpirun, or of the shell that started the ranks): every
#       rank stops within seconds, and no checkpoint is committed after;
#   (g) a save that fails on rank 3 alone (a file size limit on that rank): rank 3 says so,
#       with the path.
# FAILURE_TEST_ONLY="c e" runs only those; LIGHTRON_FAILURE_ALL=1 adds four variants of (c)
# whose checks the default ones cover. Ports: LIGHTRON_FAILURE_PORT (default 32040) and the 15
# after it. Writes only in its own mktemp folder. Prints what each scenario saw and how long it
# took; exits 1 on any failure.
set -u

build=$(cd "${1:?usage: failure_test.sh BUILD_DIR}" && pwd)
bin=$build/examples/pretrain_gpt
[[ -x $bin ]] || { echo "failure_test.sh: $bin is not built"; exit 2; }

work=$(mktemp -d /tmp/lightron_failure.XXXXXX)
port=${LIGHTRON_FAILURE_PORT:-32040}
launched=()  # pids of the background processes this script started
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

timeout_s=5  # --distributed-timeout-seconds of every scenario but (b)
# A tiny model that would train for hours: only a failure ends it.
flags=(--mock-data --vocab-size 64 --num-layers 2 --hidden-size 16 --num-attention-heads 2 --seq-length 8
  --micro-batch-size 1 --global-batch-size 4 --train-iters 1000000 --lr 1e-3 --min-lr 1e-4 --log-interval 10
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
  local deadline
  deadline=$(awk -v s="$1" -v t="$(now)" 'BEGIN { printf "%.1f", s + t }')
  shift
  until "$@"; do
    awk -v d="$deadline" -v t="$(now)" 'BEGIN { exit !(t >= d) }' && return 1
    sleep 0.1
  done
}
# ranks_gone DIR RANK...: none of these ranks' processes is alive.
ranks_gone() {
  local dir=$1 r
  shift
  for r in "$@"; do alive "$(cat "$dir/pid.$r")" && return 1; done
  return 0
}
# No library's raw text: uncaught exceptions, stack traces, source locations.
no_raw_text() {
  grep -Eq "terminate called|Exception raised from|frame #|\.(cc|cpp|h|hpp):[0-9]+\]" "$1" &&
    fail "raw library text: $(grep -Em1 "terminate called|Exception raised from|frame #|\.(cc|cpp|h|hpp):[0-9]+\]" "$1")"
}
# wrong_rank_named FILE RANK: our "no heartbeat from rank(s) ..." clauses may name RANK and no other.
wrong_rank_named() {
  local wrong
  wrong=$(grep -o "no heartbeat from rank(s) [0-9,]*" "$1" | grep -v "rank(s) $2\$")
  [[ -z $wrong ]] || fail "a wrong rank is named: $wrong"
}
# The output, without the training log.
show() { grep -Ev "^ iteration|^ pipeline bubble|^lightron: |^model: |^saved checkpoint" "$1" | sed 's/^/    | /'; }
# want SCENARIO: FAILURE_TEST_ONLY (e.g. "c e") is unset, or lists it.
want() { [[ -z ${FAILURE_TEST_ONLY:-} || " $FAILURE_TEST_ONLY " == *" $1 "* ]]; }

# start_mpirun DIR NP ARGS...: NP ranks under mpirun in the background; each writes its pid to
# DIR/pid.RANK before it becomes pretrain_gpt ($prelude, if set, runs first in that shell).
# Output in DIR/out.txt; sets $mpirun_pid. False if training does not start within 60 s.
start_mpirun() {
  local dir=$1 np=$2
  shift 2
  mkdir -p "$dir"
  port=$((port + 1))
  timeout -k 5 120 mpirun -np "$np" --oversubscribe --allow-run-as-root --bind-to none \
    -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT="$port" -x OMP_NUM_THREADS=1 \
    bash -c "echo \$\$ > $dir/pid.\$OMPI_COMM_WORLD_RANK; ${prelude:-} exec $bin ${flags[*]} $*" \
    >"$dir/out.txt" 2>&1 &
  mpirun_pid=$!
  launched+=("$mpirun_pid")
  started "$dir" "$np" "$dir/out.txt"
}
# start_direct DIR NP ARGS...: NP ranks started by this script, with Open MPI's variables set
# by hand; rank r's output in DIR/out.r, its waiter's pid in ${waiter[r]}.
declare -A waiter
start_direct() {
  local dir=$1 np=$2 r
  shift 2
  mkdir -p "$dir"
  port=$((port + 1))
  for ((r = 0; r < np; r++)); do
    OMPI_COMM_WORLD_RANK=$r OMPI_COMM_WORLD_SIZE=$np OMPI_COMM_WORLD_LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 \
      MASTER_PORT=$port OMP_NUM_THREADS=1 timeout -k 5 120 \
      sh -c "echo \$\$ > $dir/pid.$r; exec $bin ${flags[*]} $*" >"$dir/out.$r" 2>&1 &
    waiter[$r]=$!
    launched+=("$!")
  done
  started "$dir" "$np" "$dir/out.0"
}
# started DIR NP LOG: every rank wrote its pid and LOG shows a training step, within 60 s.
started() {
  local r
  training() {
    grep -q "^ iteration" "$3" || return 1
    for ((r = 0; r < $2; r++)); do [[ -s $1/pid.$r ]] || return 1; done
  }
  wait_until 60 training "$@" && return 0
  fail "$(basename "$1"): training did not start within 60 s"
  cat "$1"/out.* | sed 's/^/    | /'
  return 1
}

# ---- (a) a rank dies ----------------------------------------------------------------------
scenario_a() {
  echo "== (a) dead rank: kill -9 rank 2 of 4 under mpirun"
  dir=$work/dead
  if start_mpirun "$dir" 4; then
    kill -9 "$(cat "$dir/pid.2")"
    start=$(now)
    wait_until 15 bash -c "! kill -0 $mpirun_pid 2>/dev/null" || fail "mpirun still running 15 s after the kill"
    wait "$mpirun_pid"
    rc=$?
    echo "   mpirun exited $rc after $(seconds_since "$start") s"
    ((rc != 0 && rc != 124)) || fail "mpirun exited $rc (0: no error; 124: stopped by timeout)"
    ranks_gone "$dir" 0 1 2 3 || fail "a rank is still running"
    grep -Eq "rank 2[^0-9]|rank\(s\) 2[^0-9]" "$dir/out.txt" || fail "no line names the lost rank 2"
    wrong_rank_named "$dir/out.txt" 2
    no_raw_text "$dir/out.txt"
    show "$dir/out.txt"
  fi
}

# ---- (b) a rank never arrives ---------------------------------------------------------------
scenario_b() {
  echo "== (b) a rank that never arrives: rank 0 of 2 alone (--distributed-timeout-seconds 3)"
  dir=$work/missing
  mkdir -p "$dir"
  start=$(now)
  port=$((port + 1))
  OMPI_COMM_WORLD_RANK=0 OMPI_COMM_WORLD_SIZE=2 OMPI_COMM_WORLD_LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    timeout -k 5 30 "$bin" "${flags[@]}" --distributed-timeout-seconds 3 >"$dir/out.txt" 2>&1
  rc=$?
  elapsed=$(seconds_since "$start")
  echo "   exited $rc after $elapsed s"
  ((rc != 0 && rc != 124 && rc != 137)) || fail "expected a non-zero exit of its own, got $rc"
  awk -v e="$elapsed" 'BEGIN { exit !(e <= 10) }' || fail "took $elapsed s, more than 10 s"
  grep -q "rank(s) 1 of 2 never arrived" "$dir/out.txt" || fail "no line says 'rank(s) 1 of 2 never arrived'"
  no_raw_text "$dir/out.txt"
  show "$dir/out.txt"
}

# ---- (c) a rank is stopped ------------------------------------------------------------------
# stopped LAUNCH NP VICTIM HOW [ARGS...]: kill -STOP rank VICTIM of NP ranks started by LAUNCH
# (mpirun or direct); HOW is "forever", or "resumed" (SIGCONT after the timeout + 3 s). Every
# rank must be gone within the timeout + 10 s of the stop (the stopped one too, once resumed).
stopped() {
  local launch=$1 np=$2 victim=$3 how=$4 r
  shift 4
  local dir=$work/stopped_${launch}_${victim}_$how others=()
  for ((r = 0; r < np; r++)); do ((r == victim)) || others+=("$r"); done
  echo "== (c) $launch: kill -STOP rank $victim of $np${*:+ ($*)}, $how"
  "start_$launch" "$dir" "$np" "$@" --distributed-timeout-seconds $timeout_s || return
  local victim_pid
  victim_pid=$(cat "$dir/pid.$victim")
  kill -STOP "$victim_pid"
  local start
  start=$(now)
  if [[ $how == resumed ]]; then
    sleep $((timeout_s + 3))
    kill -CONT "$victim_pid" 2>/dev/null  # under mpirun, maybe gone: mpirun ends the job's ranks
    wait_until $((10 - 3)) ranks_gone "$dir" "${others[@]}" "$victim" ||
      fail "a rank still runs $((timeout_s + 10)) s after the stop"
    echo "   every rank gone after $(seconds_since "$start") s (rank $victim resumed after $((timeout_s + 3)) s)"
  else
    wait_until $((timeout_s + 10)) ranks_gone "$dir" "${others[@]}" ||
      fail "the other ranks still run $((timeout_s + 10)) s after the stop"
    echo "   the other ranks gone after $(seconds_since "$start") s"
    kill -9 "$victim_pid" 2>/dev/null
  fi
  if [[ $launch == mpirun ]]; then
    wait_until 10 bash -c "! kill -0 $mpirun_pid 2>/dev/null" || fail "mpirun still running"
    wait "$mpirun_pid"
    rc=$?
    ((rc != 0 && rc != 124)) || fail "mpirun exited $rc (0: no error; 124: stopped by timeout)"
  else
    for r in "${others[@]}"; do
      { wait "${waiter[$r]}"; } 2>/dev/null
      rc=$?
      ((rc != 0 && rc != 124 && rc != 137)) || fail "rank $r: expected an exit of its own, non-zero, got $rc"
      n=$(grep -c "error: " "$dir/out.$r")
      ((n == 1)) || fail "rank $r printed $n error lines, expected one"
    done
    { wait "${waiter[$victim]}"; } 2>/dev/null
    cat "$dir"/out.[0-9]* >"$dir/out.txt"
  fi
  local named="no heartbeat from rank\(s\) $victim "
  ((victim == 0)) && named="rank 0 \(the store host\)"
  grep -Eq "$named" "$dir/out.txt" || fail "no line names the stopped rank $victim"
  if [[ $launch == direct ]]; then
    for r in "${others[@]}"; do grep -Eq "$named" "$dir/out.$r" || fail "rank $r does not name the stopped rank $victim"; done
    [[ $how == forever ]] || grep -q "this rank itself was stopped" "$dir/out.$victim" ||
      fail "the resumed rank $victim does not say that it was stopped"
  fi
  wrong_rank_named "$dir/out.txt" "$victim"
  no_raw_text "$dir/out.txt"
  show "$dir/out.txt"
}

scenario_c() {
  stopped mpirun 8 3 forever --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
  stopped mpirun 4 0 forever
  stopped direct 4 2 resumed --tensor-model-parallel-size 2
  stopped direct 4 0 resumed
  # Their checks are a subset of the four above: the others give up before a stopped rank is
  # resumed, and mpirun resumes (SIGCONT) a stopped rank itself when it ends the job.
  [[ -n ${LIGHTRON_FAILURE_ALL:-} ]] || return 0
  stopped mpirun 4 1 resumed
  stopped mpirun 4 0 resumed
  stopped direct 4 1 forever
  stopped direct 4 0 forever
}

# ---- (d) a rank dies, and no launcher cleans up ----------------------------------------------
# dead_direct VICTIM: kill -9 rank VICTIM of 4 started directly; every other rank must say one
# line naming it (rank 0 as the store host), within 15 s.
dead_direct() {
  local victim=$1 r others=()
  for r in 0 1 2 3; do ((r == victim)) || others+=("$r"); done
  echo "== (d) dead rank without mpirun: kill -9 rank $victim of 4 started directly"
  dir=$work/dead_direct_$victim
  start_direct "$dir" 4 --distributed-timeout-seconds $timeout_s || return
  kill -9 "$(cat "$dir/pid.$victim")"
  start=$(now)
  { wait "${waiter[$victim]}"; } 2>/dev/null  # without bash's "Killed" job notice
  wait_until 15 ranks_gone "$dir" "${others[@]}" || fail "the other ranks still run 15 s after rank $victim was killed"
  echo "   the other ranks gone after $(seconds_since "$start") s"
  local named="no heartbeat from rank\(s\) $victim "
  ((victim == 0)) && named="rank 0 \(the store host\) is lost"
  for r in "${others[@]}"; do
    wait "${waiter[$r]}"
    rc=$?
    ((rc != 0 && rc != 124 && rc != 137)) || fail "rank $r: expected an exit of its own, non-zero, got $rc"
    n=$(grep -c "error: " "$dir/out.$r")
    ((n == 1)) || fail "rank $r printed $n error lines, expected one"
  done
  grep -Eq "$named" "$dir/out.$((victim == 0 ? 1 : 0))" || fail "rank $((victim == 0 ? 1 : 0)) does not name rank $victim"
  cat "$dir"/out.[0-3] >"$dir/out.txt"
  wrong_rank_named "$dir/out.txt" "$victim"
  no_raw_text "$dir/out.txt"
  show "$dir/out.txt"
}

scenario_d() {
  dead_direct 2
  dead_direct 0  # the store host: its peers' store threads must not die with "terminate called"
}

# ---- (e) MASTER_PORT belongs to a program that never answers ----------------------------------
scenario_e() {
  echo "== (e) MASTER_PORT held by a silent server: rank 1 of 2 (--distributed-timeout-seconds $timeout_s)"
  dir=$work/silent
  mkdir -p "$dir"
  port=$((port + 1))
  /usr/bin/python3 -c "
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', int(sys.argv[1])))
s.listen(64)
print('listening', flush=True)
held = []
while True:
    held.append(s.accept()[0])  # accept, and never answer
" "$port" >"$dir/server.txt" 2>&1 &
  server=$!
  launched+=("$server")
  wait_until 10 grep -q listening "$dir/server.txt" || fail "the silent server did not start"
  for r in 1 0; do
    start=$(now)
    OMPI_COMM_WORLD_RANK=$r OMPI_COMM_WORLD_SIZE=2 OMPI_COMM_WORLD_LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      timeout -k 5 60 "$bin" "${flags[@]}" --distributed-timeout-seconds $timeout_s >"$dir/out.$r" 2>&1
    rc=$?
    elapsed=$(seconds_since "$start")
    echo "   rank $r exited $rc after $elapsed s"
    ((rc != 0 && rc != 124 && rc != 137)) || fail "rank $r: expected a non-zero exit of its own, got $rc"
    awk -v e="$elapsed" -v l=$((timeout_s + 4)) 'BEGIN { exit !(e <= l) }' || fail "rank $r took $elapsed s"
    n=$(grep -c "error: " "$dir/out.$r")
    ((n == 1)) || fail "rank $r printed $n error lines, expected one"
    no_raw_text "$dir/out.$r"
    show "$dir/out.$r"
  done
  grep -q "no answer from the rendezvous store" "$dir/out.1" || fail "rank 1 does not say that the store never answers"
  grep -q "MASTER_PORT $port is already in use" "$dir/out.0" || fail "rank 0 does not say that the port is taken"
  kill "$server" 2>/dev/null
}

# ---- (f) the launcher dies -------------------------------------------------------------------
# gone_after_launcher DIR START: every rank gone within 10 s of START; no checkpoint committed
# after DIR/committed.txt (the checkpoints there 0.3 s after the kill).
gone_after_launcher() {
  wait_until 10 ranks_gone "$1" 0 1 2 3 || fail "a rank still runs 10 s after its launcher died"
  echo "   every rank gone after $(seconds_since "$2") s"
  (cd "$1/ckpt" && ls -d iter_???????; cat latest.json) >"$1/after.txt" 2>/dev/null
  diff "$1/committed.txt" "$1/after.txt" >/dev/null ||
    fail "a checkpoint was committed after the launcher died: $(diff "$1/committed.txt" "$1/after.txt" | grep '^>' | head -3)"
  [[ -s $1/committed.txt ]] || fail "no checkpoint was written before the kill"
}

scenario_f() {
  save=(--save-interval 1 --distributed-timeout-seconds $timeout_s)
  echo "== (f) kill -9 mpirun of 4 ranks that save a checkpoint every step"
  dir=$work/orphans_mpirun
  if start_mpirun "$dir" 4 --save "$dir/ckpt" "${save[@]}" && wait_until 30 test -f "$dir/ckpt/latest.json"; then
    kill -9 "$(ps -o ppid= -p "$(cat "$dir/pid.0")")"  # mpirun itself ($mpirun_pid is its timeout)
    start=$(now)
    { wait "$mpirun_pid"; } 2>/dev/null
    sleep 0.3
    (cd "$dir/ckpt" && ls -d iter_???????; cat latest.json) >"$dir/committed.txt" 2>/dev/null
    gone_after_launcher "$dir" "$start"
  fi
  echo "== (f) kill -9 the shell that started 4 ranks directly"
  dir=$work/orphans_direct
  mkdir -p "$dir"
  port=$((port + 1))
  bash -c "for r in 0 1 2 3; do
      OMPI_COMM_WORLD_RANK=\$r OMPI_COMM_WORLD_SIZE=4 OMPI_COMM_WORLD_LOCAL_RANK=\$r MASTER_ADDR=127.0.0.1 \
        MASTER_PORT=$port OMP_NUM_THREADS=1 sh -c \"echo \\\$\\\$ > $dir/pid.\$r; exec $bin ${flags[*]} \
        --save $dir/ckpt ${save[*]}\" >$dir/out.\$r 2>&1 &
    done
    wait" &
  shell=$!
  launched+=("$shell")
  if started "$dir" 4 "$dir/out.0" && wait_until 30 test -f "$dir/ckpt/latest.json"; then
    kill -9 "$shell"
    start=$(now)
    { wait "$shell"; } 2>/dev/null
    sleep 0.3
    (cd "$dir/ckpt" && ls -d iter_???????; cat latest.json) >"$dir/committed.txt" 2>/dev/null
    gone_after_launcher "$dir" "$start"
    cat "$dir"/out.[0-3] >"$dir/out.txt"
    for r in 0 1 2 3; do
      grep -q "its launcher bash (pid $shell) is gone; stopping" "$dir/out.$r" || fail "rank $r does not say its launcher is gone"
    done
    no_raw_text "$dir/out.txt"
    show "$dir/out.txt"
  fi
}

# ---- (g) a save fails on one rank -------------------------------------------------------------
scenario_g() {
  echo "== (g) a save that fails on rank 3 of 4 alone (tp 2 x pp 2; a 4 KiB file size limit on rank 3)"
  dir=$work/save_fails
  # A file size limit makes that rank's write fail (EFBIG; SIGXFSZ ignored, which exec keeps).
  prelude="if [ \$OMPI_COMM_WORLD_RANK = 3 ]; then trap '' XFSZ; ulimit -f 4; fi;"
  if start_mpirun "$dir" 4 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --save "$dir/ckpt" \
    --save-interval 50 --distributed-timeout-seconds $timeout_s; then
    start=$(now)
    wait_until 30 bash -c "! kill -0 $mpirun_pid 2>/dev/null" || fail "mpirun still running 30 s after training started"
    wait "$mpirun_pid"
    rc=$?
    echo "   mpirun exited $rc, $(seconds_since "$start") s after training started"
    ((rc != 0 && rc != 124)) || fail "mpirun exited $rc"
    grep -E "error: " "$dir/out.txt" | grep -q "^\[rank 3 .*rank_00003.safetensors" ||
      fail "no line from rank 3 names its file rank_00003.safetensors"
    # Others may speak before mpirun ends them, but only to point at rank 3.
    others=$(grep "error: " "$dir/out.txt" | grep -v "^\[rank 3 " | grep -Ev "rank 3 failed first|rank\(s\) 3 ")
    [[ -z $others ]] || fail "another rank blames something else: $others"
    no_raw_text "$dir/out.txt"
    show "$dir/out.txt"
  fi
  prelude=
}

for s in a b c d e f g; do
  want "$s" || continue
  scenario_start=$(now)
  "scenario_$s"
  echo "   (scenario $s took $(seconds_since "$scenario_start") s)"
done

if ((failures > 0)); then
  echo "failure_test.sh: $failures expectation(s) failed"
  exit 1
fi
echo "failure_test.sh: all scenarios behaved"
