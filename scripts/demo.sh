#!/usr/bin/env bash
# `make demo`: train a small GPT on the fortunes corpus as the 2 x 2 x 2 hybrid (tensor x
# data x pipeline) on 8 CPU ranks, then print samples. Usage: scripts/demo.sh BUILD_DIR
set -euo pipefail
build=${1:-build}
mkdir -p runs
iters=${DEMO_ITERS:-300}
mpirun -np 8 --oversubscribe --allow-run-as-root --bind-to none \
  -x OMP_NUM_THREADS=1 -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=${DEMO_PORT:-29500} \
  "$build/examples/pretrain_gpt" \
    --data-path data/fortunes_text_document --tokenizer-model data/tokenizer.model \
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
    --micro-batch-size 4 --global-batch-size 32 --train-iters "$iters" \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 20 --weight-decay 0.1 --clip-grad 1.0 \
    --eval-interval 100 --eval-iters 5 --log-interval 10 \
    --metrics-file runs/demo_metrics.jsonl --save runs/demo_checkpoint \
    --sample-tokens 60 --num-samples 3
