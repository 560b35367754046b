#!/usr/bin/env python3
"""bench/recompute.py — what activation recompute costs and saves, single process, fp32, AdamW,
mock data: tokens/s of pretrain_gpt with --recompute-granularity none, selective and full, and
the activation bytes one rank holds (pretrain_gpt --dry-run --measure: the counting allocator of
activation_meter.hpp) next to the planner's estimate.

    /usr/bin/python3 bench/recompute.py [--build build] [--configs tiny,small] [--iters 12]

tiny: V 4096, L 4, C 256, H 4, T 128, B 8. small (GPT-2 124M): V 50304, L 12, C 768, H 12,
T 256, B 4. Full recompute runs each block's forward twice: its step costs about one extra
forward, (F + F + B) / (F + B) ~ 4/3 of the step with backward ~ 2 forwards; the table prints
the measured ratio. Takes ~1 minute (tiny) and ~4 minutes (small) on 2 idle cores; run nothing
else meanwhile. Not a test: the numbers depend on the machine.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

CONFIGS = {  # V, L, C, H, T, B
    "tiny": (4096, 4, 256, 4, 128, 8),
    "small": (50304, 12, 768, 12, 256, 4),
}
MODES = ["none", "selective", "full"]


def flags(config, mode):
    V, L, C, H, T, B = CONFIGS[config]
    f = (f"--mock-data --vocab-size {V} --num-layers {L} --hidden-size {C} --num-attention-heads {H} "
         f"--seq-length {T} --micro-batch-size {B} --global-batch-size {B} --lr 1e-4 --num-threads 2").split()
    return f + ([] if mode == "none" else ["--recompute-granularity", mode])


def tokens_per_s(binary, config, mode, iters):
    """Median tokens/s of the logged iterations after the first (warm-up) one."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "metrics.jsonl")
        subprocess.run([binary] + flags(config, mode) + ["--train-iters", str(iters), "--log-interval", "1",
                                                         "--metrics-file", metrics],
                       check=True, stdout=subprocess.DEVNULL)
        rates = [json.loads(line)["tokens_per_s"] for line in open(metrics) if "tokens_per_s" in line][1:]
    rates.sort()
    return rates[len(rates) // 2]


def activations(binary, config, mode):
    """(estimated MiB, measured MiB) of the single rank."""
    out = subprocess.run([binary] + flags(config, mode) + ["--train-iters", "1", "--dry-run", "--measure"],
                         check=True, capture_output=True, text=True).stdout
    row = re.search(r"^\s+0\s+([\d.]+)\s+([\d.]+)\s+", out.split("measured (activation_meter.hpp)")[1], re.M)
    return float(row.group(1)), float(row.group(2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", default="build")
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--iters", type=int, default=12)
    args = parser.parse_args()
    binary = os.path.join(args.build, "examples", "pretrain_gpt")
    print(f"{'config':<7} {'recompute':<10} {'tokens/s':>9} {'step x none':>12} {'activ. MiB est.':>16} "
          f"{'measured':>9}")
    for config in args.configs.split(","):
        base = None
        for mode in MODES:
            rate = tokens_per_s(binary, config, mode, args.iters if config == "tiny" else max(4, args.iters // 3))
            base = base or rate
            est, measured = activations(binary, config, mode)
            print(f"{config:<7} {mode:<10} {rate:>9.0f} {base / rate:>12.3f} {est:>16.1f} {measured:>9.1f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
