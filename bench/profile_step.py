#!/usr/bin/python3
"""profile_step.py — where one training step's time goes, per ATen operator, in lightron's C++
pretrain_gpt and in the same model in PyTorch-Python (bench/pytorch_gpt.py's step), on the
same LibTorch and BLAS, one process, fp32.

    /usr/bin/python3 bench/profile_step.py --build build --config tiny [--threads 2] [--step 4]

Both sides record one step (after --step - 1 untimed ones) with LibTorch's legacy profiler as
a Chrome trace (C++: LIGHTRON_PROFILE_TRACE, see examples/pretrain_gpt.cpp; Python:
torch.autograd.profiler with use_kineto=False), under bench/throughput.sh's environment
(OMP_NUM_THREADS, glibc malloc tunables for Python). The profiler adds its own time per
operator: compare the two columns with each other, not with an unprofiled step. Each operator's self time is its duration minus that of the operators it
called. Prints a table of the operators with the most self time on either side, and each
traced step split into operator time and the rest (the language's own overhead). The
traces stay in BUILD/bench/ (open them in chrome://tracing or ui.perfetto.dev).
"""
import argparse
import collections
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import pytorch_gpt  # noqa: E402  (CONFIGS, the baseline's model and step)

TUNED_MALLOC = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def self_times(trace_file):
    """{operator: self microseconds} and the span (first start to last end) of the trace."""
    with open(trace_file) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e and e.get("cat", "cpu_op") in ("cpu_op", "Operator", "operator", ""):
            by_thread[e.get("tid", 0)].append((float(e["ts"]), float(e["dur"]), e["name"]))
    totals = collections.Counter()
    first, last = float("inf"), 0.0
    for spans in by_thread.values():
        spans.sort(key=lambda s: (s[0], -s[1]))  # a parent before the children it contains
        open_spans = []  # (end, name) of the operators still running
        for ts, dur, name in spans:
            first, last = min(first, ts), max(last, ts + dur)
            while open_spans and open_spans[-1][0] <= ts:
                open_spans.pop()
            if open_spans:
                totals[open_spans[-1][1]] -= dur  # the parent's time, spent in this child
            totals[name] += dur
            open_spans.append((ts + dur, name))
    return totals, (last - first if last > first else 0.0)



def python_trace(config, threads, step, out):
    import torch
    import gpt_reference as ref
    torch.set_num_threads(threads)
    cfg, B = pytorch_gpt.CONFIGS[config]
    torch.manual_seed(1234)
    model = ref.GPT(cfg)
    T, V = cfg["seq_length"], cfg["vocab_size"]
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)

    def one_step():
        tokens, labels = torch.randint(V, (B, T)), torch.randint(V, (B, T))
        opt.zero_grad(set_to_none=True)
        loss = model.loss(tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(step - 1):
        one_step()
    with torch.autograd.profiler.profile(use_kineto=False) as prof:  # the legacy profiler, as the C++ side
        one_step()
    prof.export_chrome_trace(out)


def cpp_trace(build, config, threads, step, out):
    cfg, B = pytorch_gpt.CONFIGS[config]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), LIGHTRON_PROFILE_TRACE=out,
               LIGHTRON_PROFILE_ITERATION=str(step))
    cmd = [os.path.join(build, "examples", "pretrain_gpt"), "--mock-data", "--vocab-size", str(cfg["vocab_size"]),
           "--num-layers", str(cfg["num_layers"]), "--hidden-size", str(cfg["hidden_size"]),
           "--num-attention-heads", str(cfg["num_attention_heads"]), "--seq-length", str(cfg["seq_length"]),
           "--micro-batch-size", str(B), "--global-batch-size", str(B), "--train-iters", str(step),
           "--log-interval", "1", "--lr", "1e-4", "--num-threads", str(threads)]
    run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if run.returncode != 0:
        sys.exit(f"profile_step.py: pretrain_gpt failed:\n{run.stdout[-3000:]}")
    if not os.path.exists(out):
        sys.exit(f"profile_step.py: pretrain_gpt wrote no trace to {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build", default="build")
    p.add_argument("--config", choices=sorted(pytorch_gpt.CONFIGS), default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--step", type=int, default=4, help="the step recorded (after step - 1 untimed ones)")
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--python-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = os.path.join(args.build, "bench")
    os.makedirs(out, exist_ok=True)
    cpp_file, py_file = os.path.join(out, f"trace_cpp_{args.config}.json"), os.path.join(out, f"trace_py_{args.config}.json")
    if args.python_only:  # in a child with the environment of bench/throughput.sh
        python_trace(args.config, args.threads, args.step, py_file)
        return
    cpp_trace(args.build, args.config, args.threads, args.step, cpp_file)
    env = dict(os.environ, GLIBC_TUNABLES=TUNED_MALLOC, OMP_NUM_THREADS=str(args.threads))
    child = subprocess.run([sys.executable, __file__, "--python-only", "--build", args.build, "--config", args.config,
                            "--threads", str(args.threads), "--step", str(args.step)],
                           stdout=subprocess.PIPE, text=True, env=env, check=True)
    assert os.path.exists(py_file), child.stdout
    cpp, cpp_span = self_times(cpp_file)
    py, py_span = self_times(py_file)
    names = sorted(set(cpp) | set(py), key=lambda n: -max(cpp.get(n, 0), py.get(n, 0)))[: args.top]
    print(f"one step of '{args.config}', {args.threads} threads, self time per operator (ms):")
    print(f"{'operator':<40} {'python':>9} {'lightron':>9} {'ratio':>7}")
    for n in names:
        a, b = py.get(n, 0) / 1000, cpp.get(n, 0) / 1000
        print(f"{n[:40]:<40} {a:>9.2f} {b:>9.2f} {(b / a if a > 0 else float('inf')):>7.2f}")
    for label, table, span in (("python", py, py_span), ("lightron", cpp, cpp_span)):
        ops = sum(table.values()) / 1000
        print(f"{label:>8}: the traced step {span / 1000:.1f} ms = operators {ops:.1f} ms + outside them "
              f"{span / 1000 - ops:.1f} ms (the language, the profiler's own bookkeeping)")
    print(f"traces: {cpp_file} {py_file}")


if __name__ == "__main__":
    main()
