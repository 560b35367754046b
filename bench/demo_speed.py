#!/usr/bin/env python3
"""What bounds `make demo`'s speed: the 2 x 2 x 2 layout's eight ranks on this machine's cores.

    python3 bench/demo_speed.py [--build build] [--iters 40]

Runs the demo's model and flags (scripts/demo.sh; no evaluation, saving or samples) as
  * the demo: tp 2 x dp 2 x pp 2 on 8 ranks, one thread each;
  * dp 2 on 2 ranks (one rank per core);
  * one rank with 1 thread, and with as many threads as cores;
each twice (a short and a long run) so that the difference of the two gives the CPU seconds
per training step without the start-up. Per run it prints tokens/s (median step), the CPU
seconds per step of all ranks together (user + system, from the shell's `times`), how busy
that keeps the cores, and for the demo what its pipeline timeline and --comm-file say: the
CPU inside forward/backward, the wall time inside collectives per group, and the bubble.
Needs an idle machine and the demo's data (`make data`). Takes about 2 minutes on 2 cores.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

DEMO = ("--data-path data/fortunes_text_document --tokenizer-model data/tokenizer.model "
        "--num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 "
        "--micro-batch-size 4 --global-batch-size 32 --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 20 "
        "--weight-decay 0.1 --clip-grad 1.0 --eval-interval 100000 --log-interval 1").split()
TOKENS_PER_STEP = 32 * 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the demo's data paths start here


def run(args, work, name, ranks, threads, layout, iters):
    """One run; returns (median ms per step, CPU seconds of all ranks, metrics file, work dir)."""
    out = os.path.join(work, f"{name}_{iters}")
    os.makedirs(out, exist_ok=True)
    flags = DEMO + layout + ["--train-iters", str(iters), "--num-threads", str(threads),
                             "--metrics-file", f"{out}/metrics.jsonl", "--comm-file", f"{out}/comm.jsonl",
                             "--timeline-file", f"{out}/timeline.jsonl"]
    # Each rank reports its own CPU time (user + system of the program, from bash's `times`).
    wrapped = ["bash", "-c", f'"$@" > {out}/log.$$ 2>&1; s=$?; times > {out}/times.$$; exit $s', "rank",
               os.path.join(os.path.abspath(args.build), "examples", "pretrain_gpt")] + flags
    if ranks == 1:
        cmd = wrapped
    else:
        cmd = ["mpirun", "-np", str(ranks), "--oversubscribe", "--allow-run-as-root", "--bind-to", "none",
               "-x", f"OMP_NUM_THREADS={threads}", "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={args.port}"] + wrapped
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if subprocess.run(cmd, env=env, cwd=ROOT).returncode != 0:
        sys.exit(f"demo_speed.py: the run '{name}' failed; logs in {out}")
    cpu = 0.0
    for f in os.listdir(out):
        if f.startswith("times."):
            children = open(os.path.join(out, f)).read().split("\n")[1].split()  # "0m1.2s 0m0.3s"
            cpu += sum(float(x[:-1].split("m")[0]) * 60 + float(x[:-1].split("m")[1]) for x in children)
    steps = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if '"ms_per_iter"' in l]
    ms = statistics.median(s["ms_per_iter"] for s in steps[3:])
    return ms, cpu, out


def rank_files(out, stem):
    return sorted(os.path.join(out, f) for f in os.listdir(out) if f.startswith(stem + ".rank"))


def demo_breakdown(out, first_iteration):
    """Per rank and step, averaged over ranks and iterations >= first_iteration: CPU seconds
    inside forward/backward, wall seconds waiting for a pipeline message, the measured
    bubble, and wall seconds in each other group's collectives (tp's are blocking, inside
    forward/backward; dp's start during backward and are waited for at its end)."""
    compute, waits, bubble, comm = [], [], [], {}
    for path in rank_files(out, "timeline.jsonl"):
        by_iteration = {}
        for e in map(json.loads, open(path)):
            if e["iteration"] >= first_iteration:
                by_iteration.setdefault(e["iteration"], []).append(e)
        for events in by_iteration.values():
            actions = [e for e in events if e["kind"] in ("F", "B")]
            waited = sum(e["end"] - e["start"] for e in events if e["kind"] == "wait")
            span = max(e["end"] for e in actions) - min(e["start"] for e in actions)
            compute.append(sum(e["cpu"] for e in actions))
            waits.append(waited)
            bubble.append(1 - (sum(e["end"] - e["start"] for e in actions) - waited) / span)
    files = rank_files(out, "comm.jsonl")
    for path in files:
        rows = [r for r in map(json.loads, open(path)) if r["iteration"] >= first_iteration]
        for r in rows:
            for c in r["comm"]:
                if c["group"] != "pp":  # sends/receives overlap: their waits are in the timeline
                    key = f'{c["group"]} {c["op"]}'
                    comm[key] = comm.get(key, 0) + c["seconds"] / len(rows) / len(files)
    return statistics.mean(compute), statistics.mean(waits), statistics.mean(bubble), comm


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build", default="build")
    p.add_argument("--iters", type=int, default=40, help="steps of the long runs (the short ones: 10)")
    p.add_argument("--port", type=int, default=29571)
    args = p.parse_args()
    cores = os.cpu_count()
    short = 10
    runs = [("demo tp2 x dp2 x pp2, 8 ranks x 1 thread", 8, 1,
             ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
            ("dp 2, 2 ranks x 1 thread", 2, 1, []),
            ("1 rank x 1 thread", 1, 1, []),
            (f"1 rank x {cores} threads", 1, cores, [])]
    print(f"demo model (L 4, C 128, H 4, T 128, global batch 32) on {cores} cores, {args.iters} steps")
    print(f"{'run':44} {'tokens/s':>9} {'ms/step':>8} {'CPU s/step':>10} {'cores busy':>10}")
    with tempfile.TemporaryDirectory() as work:
        for name, ranks, threads, layout in runs:
            label = name.split(",")[0].replace(" ", "_")
            _, cpu_short, _ = run(args, work, label, ranks, threads, layout, short)
            ms, cpu_long, out = run(args, work, label, ranks, threads, layout, args.iters)
            cpu_step = (cpu_long - cpu_short) / (args.iters - short)
            busy = cpu_step / (ms / 1000) / cores
            print(f"{name:44} {TOKENS_PER_STEP / (ms / 1000):9.0f} {ms:8.1f} {cpu_step:10.3f} {100 * busy:9.0f}%")
            if ranks == 8:
                demo = (ms, cpu_step) + demo_breakdown(out, short + 1)
        ms, cpu_step, compute, waits, bubble, comm = demo
        print(f"demo, all ranks per step: CPU {cpu_step:.3f} s, of which {8 * compute:.3f} s inside forward/backward "
              f"(the rest: optimizer, gradient all-reduce, Gloo's threads, the kernel's TCP)")
        print(f"demo, per rank per step ({ms / 1000:.3f} s): computing {compute:.3f} s CPU, waiting for pipeline "
              f"messages {waits:.3f} s, bubble {100 * bubble:.0f}%; in collectives " +
              ", ".join(f"{k} {s:.3f} s" for k, s in sorted(comm.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
