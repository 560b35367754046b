#!/usr/bin/env bash
# checkpoint_test.sh BUILD_DIR — checkpoints through pretrain_gpt, each phase a new process
# (a new mpirun), as a user would resume:
#   (a) bit-exact resume: 20 steps straight vs 10 + save + resume + 10, at 1x1x1 and 2x2x2
#       (tp x dp x pp): every logged loss identical as a hex float (metrics "loss_hex"), and
#       the final shard files identical byte for byte (weights and AdamW state);
#   (b) resharding: the 2x2x2 checkpoint resumed at 1x1x1 and at 2x1x1: the next loss
#       matches the 2x2x2 one within the cross-layout tolerance (relative 1e-5);
#   (c) a crash during save (LIGHTRON_TEST_CRASH_IN_SAVE=3: rank 3 dies halfway through its
#       file): the next start loads the previous checkpoint and says it skipped the other;
#   (d) a truncated shard and a flipped byte: refused with one line naming the file, exit 2;
#   (e) another model shape: refused before step 1, naming both values;
#   (f) HF export and examples/generate from both formats (greedy: the same text).
# Prints what each case saw; exits 1 if any expectation failed.
set -u

build=$(cd "${1:?usage: checkpoint_test.sh BUILD_DIR}" && pwd)
src=$(cd "$(dirname "$0")/.." && pwd)
bin=$build/examples/pretrain_gpt
for b in pretrain_gpt convert_checkpoint generate; do
  [[ -x $build/examples/$b ]] || { echo "checkpoint_test.sh: $build/examples/$b is not built"; exit 2; }
done
work=$(mktemp -d /tmp/lightron_ckpt.XXXXXX)
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# A model that trains 20 steps in about a second; the vocabulary pads to 64 for tp 1 and 2,
# and --lr-decay-iters fixes the schedule whatever --train-iters a phase stops at.
# (run adds --hidden-size $HIDDEN, 32 unless set.)
tiny=(--mock-data --vocab-size 64 --make-vocab-size-divisible-by 32 --num-layers 4
  --num-attention-heads 4 --seq-length 16 --micro-batch-size 1 --global-batch-size 8 --lr 3e-3 --min-lr 3e-4
  --lr-warmup-iters 2 --lr-decay-iters 20 --adam-eps 1e-6 --log-interval 1 --num-threads 1)
threed=(--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2)
port=29970

# run NP OUT ARGS...: pretrain_gpt on NP ranks (1: no mpirun), stdout+stderr to OUT; its exit code.
run() {
  local np=$1 out=$2
  shift 2
  port=$((port + 1))
  if ((np == 1)); then
    timeout -k 5 300 "$bin" "${tiny[@]}" --hidden-size "${HIDDEN:-32}" "$@" >"$out" 2>&1
  else
    timeout -k 5 300 mpirun -np "$np" --oversubscribe --allow-run-as-root --bind-to none -x MASTER_ADDR=127.0.0.1 \
      -x MASTER_PORT=$port -x OMP_NUM_THREADS=1 ${LIGHTRON_TEST_CRASH_IN_SAVE:+-x LIGHTRON_TEST_CRASH_IN_SAVE} \
      "$bin" "${tiny[@]}" --hidden-size "${HIDDEN:-32}" "$@" >"$out" 2>&1
  fi
}
# "iteration loss_hex" per logged step of a metrics file.
losses() { sed -n 's/.*"iteration": \([0-9]*\),.*"loss_hex": "\([^"]*\)".*/\1 \2/p' "$1"; }
# The loss (%.9g) logged at iteration $2.
loss_at() { sed -n "s/.*\"iteration\": $2,.*\"loss\": \([^,]*\),.*/\1/p" "$1"; }
show() { grep -v "^ iteration" "$1" | sed 's/^/    | /'; }
one_error_line() {  # FILE TEXT: exit 2 was checked; exactly one "error:" line, containing TEXT
  local n
  n=$(grep -c "error:" "$1")
  ((n == 1)) || fail "$(basename "$1"): $n error lines, expected one"
  grep "error:" "$1" | grep -qF "$2" || fail "$(basename "$1"): the error does not say '$2'"
  grep -Eq "terminate called|Exception raised from|frame #" "$1" && fail "$(basename "$1"): a raw exception"
  grep "error:" "$1" | sed 's/^/    | /'
}

# ---- (a) bit-exact resume ---------------------------------------------------------------------
resume_case() {  # NAME NP LAYOUT-FLAGS...
  local name=$1 np=$2
  shift 2
  local d=$work/$name
  mkdir -p "$d"
  run "$np" "$d/straight.txt" "$@" --train-iters 20 --save "$d/straight" --metrics-file "$d/straight.jsonl" ||
    { fail "$name: the straight run failed"; show "$d/straight.txt"; return; }
  run "$np" "$d/first.txt" "$@" --train-iters 10 --save "$d/resumed" --metrics-file "$d/first.jsonl" ||
    { fail "$name: the first half failed"; show "$d/first.txt"; return; }
  run "$np" "$d/second.txt" "$@" --train-iters 20 --load "$d/resumed" --save "$d/resumed" --metrics-file "$d/second.jsonl" ||
    { fail "$name: the resumed half failed"; show "$d/second.txt"; return; }
  grep -q "resumed from .* at iteration 10 (80 samples consumed)" "$d/second.txt" || fail "$name: no 'resumed from ... at iteration 10'"
  losses "$d/straight.jsonl" >"$d/a.txt"
  cat <(losses "$d/first.jsonl") <(losses "$d/second.jsonl") >"$d/b.txt"
  [[ $(wc -l <"$d/a.txt") == 20 ]] || fail "$name: expected 20 logged losses, got $(wc -l <"$d/a.txt")"
  diff "$d/a.txt" "$d/b.txt" >/dev/null || { fail "$name: the losses differ"; diff "$d/a.txt" "$d/b.txt" | head; }
  local files=0 f
  for f in "$d"/straight/iter_0000020/rank_*.safetensors; do
    files=$((files + 1))
    cmp -s "$f" "$d/resumed/iter_0000020/$(basename "$f")" || fail "$name: $(basename "$f") differs"
  done
  [[ $(ls "$d"/resumed/iter_0000020/rank_*.safetensors | wc -l) == "$files" ]] || fail "$name: different file counts"
  echo "   $name: 20 losses identical as hex floats (step 20: $(tail -1 "$d/b.txt" | cut -d' ' -f2));" \
    "$files shard file(s) identical byte for byte"
}
echo "== (a) bit-exact resume: 20 steps vs 10 + save + new process + 10"
resume_case 1x1x1 1
resume_case 2x2x2 8 "${threed[@]}"

# ---- (b) resharding through new processes -----------------------------------------------------
echo "== (b) the 2x2x2 checkpoint of iteration 20 resumed at 1x1x1 and 2x1x1 for one step"
d=$work/reshard
mkdir -p "$d"
run 8 "$d/same.txt" "${threed[@]}" --train-iters 21 --load "$work/2x2x2/straight" --metrics-file "$d/same.jsonl" ||
  { fail "2x2x2 -> 2x2x2 failed"; show "$d/same.txt"; }
ref=$(loss_at "$d/same.jsonl" 21)
for case in "1x1x1 1" "2x1x1 2 --tensor-model-parallel-size 2"; do
  set -- $case
  name=$1 np=$2
  shift 2
  run "$np" "$d/$name.txt" "$@" --train-iters 21 --load "$work/2x2x2/straight" --metrics-file "$d/$name.jsonl" ||
    { fail "2x2x2 -> $name failed"; show "$d/$name.txt"; continue; }
  got=$(loss_at "$d/$name.jsonl" 21)
  awk -v a="$got" -v b="$ref" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= 1e-5 * b) }' ||
    fail "2x2x2 -> $name: loss $got at step 21, 2x2x2 gives $ref"
  echo "   2x2x2 -> $name: step 21 loss $got (2x2x2: $ref)"
done

# ---- (c) a rank dies while saving -----------------------------------------------------------
echo "== (c) crash during save: rank 3 of 4 (tp 2 x pp 2) dies halfway through its file at iteration 20"
d=$work/crash
mkdir -p "$d"
run 4 "$d/first.txt" "${threed[@]}" --train-iters 10 --save "$d/ckpt" || { fail "first run failed"; show "$d/first.txt"; }
LIGHTRON_TEST_CRASH_IN_SAVE=3 run 4 "$d/crashed.txt" "${threed[@]}" --train-iters 20 --load "$d/ckpt" --save "$d/ckpt" \
  --metrics-file "$d/crashed.jsonl"
rc=$?
((rc != 0)) || fail "the run with a crashing rank exited 0"
echo "   crashed run exited $rc; left: $(cd "$d/ckpt" && ls -d iter_* | tr '\n' ' ')"
[[ -d $d/ckpt/iter_0000020.tmp && ! -e $d/ckpt/iter_0000020 ]] || fail "expected iter_0000020.tmp and no iter_0000020"
grep -q '"iteration": 10' "$d/ckpt/latest.json" || fail "latest.json does not point to iteration 10"
run 4 "$d/after.txt" "${threed[@]}" --train-iters 20 --load "$d/ckpt" --save "$d/ckpt" --metrics-file "$d/after.jsonl" ||
  fail "the restart failed"
grep -q "skipped $d/ckpt/iter_0000020.tmp: incomplete" "$d/after.txt" || fail "the restart does not say it skipped iter_0000020.tmp"
grep -q "resumed from .* at iteration 10" "$d/after.txt" || fail "the restart did not resume from iteration 10"
diff <(losses "$d/crashed.jsonl") <(losses "$d/after.jsonl") >/dev/null || fail "the restart's losses differ from the crashed run's"
[[ -f $d/ckpt/iter_0000020/manifest.json && ! -e $d/ckpt/iter_0000020.tmp ]] || fail "iteration 20 was not saved on restart"
show "$d/after.txt" | grep -E "skipped|resumed|loaded|saved"

# ---- (d) damaged files -----------------------------------------------------------------------
echo "== (d) a truncated shard and a flipped byte"
d=$work/damaged
mkdir -p "$d"
for kind in truncated flipped; do
  cp -r "$work/1x1x1/resumed" "$d/$kind"
  f=$d/$kind/iter_0000020/rank_00000.safetensors
  if [[ $kind == truncated ]]; then
    truncate -s $(($(stat -c %s "$f") / 2)) "$f"
  else
    /usr/bin/python3 -c "import sys; b = bytearray(open(sys.argv[1], 'rb').read()); b[len(b) // 2] ^= 1; open(sys.argv[1], 'wb').write(b)" "$f"
  fi
  run 1 "$d/$kind.txt" --train-iters 21 --load "$d/$kind"
  rc=$?
  ((rc == 2)) || fail "$kind: exit $rc, expected 2"
  one_error_line "$d/$kind.txt" "$f: $([[ $kind == truncated ]] && echo truncated || echo checksum mismatch)"
done

# ---- (e) another model -----------------------------------------------------------------------
echo "== (e) resuming with --hidden-size 64 a checkpoint of hidden size 32"
HIDDEN=64 run 1 "$work/shape.txt" --train-iters 21 --load "$work/1x1x1/resumed"
rc=$?
((rc == 2)) || fail "exit $rc, expected 2"
one_error_line "$work/shape.txt" "hidden-size 32, this run has hidden-size 64"
grep -q "^ iteration" "$work/shape.txt" && fail "a step ran before the refusal"

# ---- (f) HuggingFace export and generate -------------------------------------------------------
echo "== (f) export to HuggingFace and generate from both formats (greedy)"
if [[ -f $src/data/tokenizer.model && -f $src/data/fortunes_text_document.bin ]]; then
  d=$work/generate
  mkdir -p "$d"
  timeout 120 "$bin" --data-path "$src/data/fortunes_text_document" --tokenizer-model "$src/data/tokenizer.model" \
    --num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --micro-batch-size 4 --global-batch-size 4 \
    --train-iters 5 --num-threads 1 --save "$d/ckpt" >"$d/train.txt" 2>&1 || { fail "training on data/ failed"; show "$d/train.txt"; }
  "$build/examples/convert_checkpoint" --load "$d/ckpt" --export-hf "$d/hf" >"$d/convert.txt" 2>&1 || fail "export failed"
  for what in ckpt hf; do
    "$build/examples/generate" --load "$d/$what" --tokenizer-model "$src/data/tokenizer.model" --prompt "Love is" \
      --max-new-tokens 12 --temperature 0 >"$d/gen_$what.txt" 2>&1 || { fail "generate --load $what failed"; cat "$d/gen_$what.txt"; }
  done
  diff <(grep "^---" "$d/gen_ckpt.txt") <(grep "^---" "$d/gen_hf.txt") >/dev/null || fail "the two formats generate different text"
  grep -q "^--- *Love is" "$d/gen_ckpt.txt" || fail "no sample starting with the prompt"
  sed 's/^/    | /' "$d/convert.txt" "$d/gen_hf.txt"
else
  echo "   skipped: no data/tokenizer.model (run make data)"
fi

if ((failures > 0)); then
  echo "checkpoint_test.sh: $failures expectation(s) failed"
  exit 1
fi
echo "checkpoint_test.sh: all cases behaved"
