#!/usr/bin/python3
"""pytorch_gpt.py — training throughput of lightron's GPT-2 flavour in PyTorch-Python, the
baseline for examples/pretrain_gpt (bench/throughput.sh runs both).

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184 \
      /usr/bin/python3 bench/pytorch_gpt.py --config tiny --iters 30 --warmup 5 --threads 2

The model is tests/gpt_reference.py's GPT (same init as lightron for the same seed); one step
is forward, mean cross-entropy, backward, grad-norm clipping at 1.0, AdamW (lr 1e-4, weight
decay 0.1 on matrices only, betas 0.9/0.95), on random tokens, fp32. The first --warmup
steps are not timed. Prints one JSON line.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import gpt_reference as ref  # noqa: E402

# (model config, micro-batch size B)
CONFIGS = {
    "tiny": (dict(vocab_size=4096, num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=128), 8),
    "small": (dict(vocab_size=50304, num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=256), 4),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--iters", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--turns", metavar="IN:OUT",
                   help="take turns with pretrain_gpt (LIGHTRON_BENCH_TURNS=OUT:IN) one step at a time "
                        "through two FIFOs: bench/throughput.sh")
    args = p.parse_args()
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--iters and --threads must be >= 1, --warmup >= 0")
    if args.turns and (args.turns.count(":") != 1 or not all(
            os.path.exists(f) for f in args.turns.split(":"))):
        p.error(f"--turns wants IN:OUT, two existing FIFOs (bench/throughput.sh makes them); got '{args.turns}'")
    torch.set_num_threads(args.threads)

    cfg, B = CONFIGS[args.config]
    torch.manual_seed(args.seed)
    model = ref.GPT(cfg)
    T, V = cfg["seq_length"], cfg["vocab_size"]
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)

    turn_in = turn_out = None
    if args.turns:  # the opening order pairs with pretrain_gpt's (its IN first, then its OUT)
        fifo_in, fifo_out = args.turns.split(":")
        turn_out = open(fifo_out, "wb", buffering=0)
        turn_in = open(fifo_in, "rb", buffering=0)
        turn_out.write(b"r")  # ready: the other side's first step may start

    times, losses = [], []
    for step in range(args.warmup + args.iters):
        if turn_in and turn_in.read(1) != b"t":
            sys.exit("pytorch_gpt.py: --turns: the other side stopped")
        tokens = torch.randint(V, (B, T))
        labels = torch.randint(V, (B, T))
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model.loss(tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            losses.append(loss_value)
        if turn_out:
            try:
                turn_out.write(b"p")
            except BrokenPipeError:
                sys.exit("pytorch_gpt.py: --turns: the other side stopped")

    seconds = sum(times)
    tokens_per_s = B * T * len(times) / seconds
    fpt = ref.flops_per_token(model)
    print(json.dumps({
        "impl": "pytorch", "config": args.config, "threads": args.threads,
        "tokens_per_s": round(tokens_per_s, 1), "ms_per_iter": round(1000 * seconds / len(times), 2),
        "ms_per_iter_min": round(1000 * min(times), 2),
        "ms_per_iter_median": round(1000 * statistics.median(times), 2),
        "ms_per_step": [round(1000 * t, 2) for t in times], "iters": len(times), "warmup": args.warmup,
        "tokens_per_iter": B * T,
        "params": sum(q.numel() for q in model.parameters()), "flops_per_token": fpt,
        "tflops": round(tokens_per_s * fpt / 1e12, 4), "last_loss": round(losses[-1], 4),
        "torch": torch.__version__}))


if __name__ == "__main__":
    main()
