#!/usr/bin/env bash
# bash scripts/prepare_corpus.sh build
#
# Makes the demo corpus from Debian's fortune files (packages fortunes, fortunes-min):
#   data/fortunes.txt                    one fortune a line, its newlines written as "<n>"
#   data/tokenizer.{model,vocab}         a 2048-piece SentencePiece BPE (log: data/spm_train.log)
#   data/fortunes.ids                    the same lines as token ids (spm_encode)
#   data/fortunes_text_document.{bin,idx}  a Megatron indexed dataset, </s> (id 2) after each
# Each step is skipped when its outputs exist and are newer than its input, and writes
# through a temporary name, so an interrupted run is simply run again. Used by `make data`.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 BUILD_DIR   (the CMake build directory with examples/preprocess_data)" >&2
  exit 2
fi
build_dir=$(cd "$1" 2>/dev/null && pwd) || { echo "error: $1: no such build directory; run \`make build\`" >&2; exit 2; }
cd "$(dirname "$0")/.."
fortune_dir=/usr/share/games/fortunes
vocab_size=2048
prefix=data/fortunes_text_document
start=$SECONDS
mkdir -p data

# True when the first file is missing or older than one of the others.
stale() {
  local out=$1; shift
  [ -e "$out" ] || return 0
  for input in "$@"; do [ "$input" -nt "$out" ] && return 0; done
  return 1
}

if stale data/fortunes.txt; then
  [ -d "$fortune_dir" ] || { echo "error: $fortune_dir missing; apt-get install fortunes fortunes-min" >&2; exit 2; }
  files=()
  for f in "$fortune_dir"/*; do  # the glob is sorted; off/ (offensive) is a directory: skipped
    case "$f" in *.dat|*.u8) continue ;; esac
    [ -f "$f" ] && files+=("$f")
  done
  # Entries end at lines holding only "%". Per line: drop CRs, undo overstriking (bold
  # "X\bX", underline "__\b\bAB", accents "'\be"), trim trailing blanks. An entry's lines
  # are joined by "<n>", without leading or trailing empty ones.
  for f in "${files[@]}"; do cat "$f"; printf '\n%%\n'; done |
    LC_ALL=C sed -e 's/\r$//' -e 's/_\+\x08\+//g' -e 's/.\x08//g' -e 's/\x08//g' |
    LC_ALL=C awk '
      function flush() {
        gsub(/^(<n>)+/, "", entry); gsub(/(<n>)+$/, "", entry)
        if (entry ~ /[^ \t]/) print entry
        entry = ""; lines = 0
      }
      /^%[ \t]*$/ { flush(); next }
      { sub(/[ \t]+$/, ""); entry = (lines++ ? entry "<n>" : "") $0 }
      END { flush() }' > data/fortunes.txt.tmp
  mv data/fortunes.txt.tmp data/fortunes.txt
  echo "data/fortunes.txt: $(wc -l < data/fortunes.txt) fortunes from ${#files[@]} files"
fi

if stale data/tokenizer.model data/fortunes.txt || stale data/tokenizer.vocab data/fortunes.txt; then
  spm_train --input=data/fortunes.txt --model_prefix=data/tokenizer.tmp \
    --vocab_size=$vocab_size --model_type=bpe --user_defined_symbols='<n>' \
    --character_coverage=1.0 --byte_fallback=true > data/spm_train.log 2>&1 ||
    { echo "error: spm_train failed; see data/spm_train.log" >&2; exit 1; }
  mv data/tokenizer.tmp.vocab data/tokenizer.vocab
  mv data/tokenizer.tmp.model data/tokenizer.model
  echo "data/tokenizer.model: $vocab_size pieces (log: data/spm_train.log)"
fi

if stale data/fortunes.ids data/tokenizer.model data/fortunes.txt; then
  spm_encode --model=data/tokenizer.model --output_format=id < data/fortunes.txt > data/fortunes.ids.tmp
  mv data/fortunes.ids.tmp data/fortunes.ids
fi

if stale $prefix.idx data/fortunes.ids || stale $prefix.bin data/fortunes.ids; then
  preprocess="$build_dir/examples/preprocess_data"
  [ -x "$preprocess" ] || { echo "error: $preprocess not found; run \`cmake --build $1 --target preprocess_data\`" >&2; exit 2; }
  "$preprocess" --input data/fortunes.ids --output-prefix $prefix.tmp --append-eod \
    --vocab-size $vocab_size > /dev/null
  mv $prefix.tmp.bin $prefix.bin
  mv $prefix.tmp.idx $prefix.idx
fi

# The summary, read back from the files: sequence count at byte 18 of .idx, uint16 tokens.
documents=$(od -An -t u8 -j 18 -N 8 $prefix.idx | tr -d ' ')
tokens=$(( $(stat -c %s $prefix.bin) / 2 ))
echo "corpus: $documents documents, $tokens tokens (vocab $vocab_size) in $prefix.{bin,idx}," \
     "tokenizer data/tokenizer.{model,vocab} ($((SECONDS - start)) s)"
