#!/usr/bin/python3
"""reference_check.py — pins lightron's C++ GPT to an independent PyTorch model.

    /usr/bin/python3 tests/reference_check.py --tests-binary build/tests/lightron_tests --workdir DIR

1. Runs `lightron_tests -ts=reference_dump` with LIGHTRON_DUMP_DIR=DIR; the C++ side writes
   DIR/gpt2.pt and DIR/llama.pt (torch::pickle_save of a Dict<string, Tensor>) holding
   config.<key>, param.<name>, tokens, labels (B, T), logits (B, T, V), loss and grad.<name>.
2. Builds tests/gpt_reference.py's GPT from the config, loads the weights, runs forward and
   backward in fp64 on the same batch, and compares logits, loss and every gradient:
   rel = max|cpp - ref| / max(max|ref|, tiny) must be <= 1e-5 for fp32 dumps. Prints one line
   per tensor and a summary.
3. Proves it can fail: plants errors in the reference (Q and K rows swapped in
   h.0.attn.c_attn.weight; two layers' MLP weights swapped; the rotary sign negated) and
   requires each one to be caught.

Exit 0 when everything matches and every planted error is caught, 1 otherwise.
`--self-test` writes the dumps with the Python model itself (no C++ needed) and checks them.
"""
import argparse
import contextlib
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt_reference as ref  # noqa: E402

FLAVOURS = ("gpt2", "llama")
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}  # rel, by the dumped dtype
TINY = 1e-30  # denominator floor: an all-zero reference tensor must be matched exactly-ish
# Strings travel as integer codes in the dump.
STRING_CODES = {"normalization": ("LayerNorm", "RMSNorm"),
                "position_embedding_type": ("learned_absolute", "rope")}
# C++ GPTConfig field names accepted as aliases of the short keys.
ALIASES = {"untie_embeddings_and_output_weights": "untie", "add_bias_linear": "bias"}
BOOL_KEYS = ("swiglu", "untie", "bias")


# ---- dump <-> model ------------------------------------------------------------------

def config_from_dump(dump):
    cfg = {}
    for key, value in dump.items():
        if not key.startswith("config."):
            continue
        name = ALIASES.get(key[len("config."):], key[len("config."):])
        v = value.item()
        if name in STRING_CODES:
            v = STRING_CODES[name][int(v)]
        elif name in BOOL_KEYS:
            v = bool(v)
        cfg[name] = v
    return ref.make_config(cfg)


def model_from_dump(dump, dtype, seed=1):
    """The reference model with the dump's weights (after its own, different, random init)."""
    torch.manual_seed(seed)
    model = ref.GPT(config_from_dump(dump)).to(dtype)
    expected = dict(model.named_parameters())
    dumped = {k[len("param."):]: v for k, v in dump.items() if k.startswith("param.")}
    problems = [f"missing param.{n} {tuple(p.shape)}" for n, p in expected.items() if n not in dumped]
    problems += [f"unexpected param.{n} {tuple(v.shape)}" for n, v in dumped.items() if n not in expected]
    problems += [f"param.{n}: shape {tuple(v.shape)}, reference has {tuple(expected[n].shape)}"
                 for n, v in dumped.items() if n in expected and v.shape != expected[n].shape]
    if problems:
        return None, problems
    with torch.no_grad():
        for n, p in expected.items():
            p.copy_(dumped[n].to(dtype))
    return model, []


def run_reference(model, dump):
    """logits, loss and grads of the reference on the dump's batch."""
    model.zero_grad(set_to_none=True)
    logits = model(dump["tokens"])
    loss = model.loss_of(logits, dump["labels"])
    loss.backward()
    out = {"logits": logits.detach(), "loss": loss.detach()}
    out.update({f"grad.{n}": p.grad for n, p in model.named_parameters()})
    return out


# ---- comparison ----------------------------------------------------------------------

def compare(dump, expected, rtol, verbose):
    """One row per tensor: (name, max abs diff, rel diff, ok). Missing tensors fail."""
    rows = []
    for name, b in expected.items():
        if name not in dump:
            rows.append((name, float("nan"), float("nan"), False, "missing from the C++ dump"))
            continue
        a = dump[name].detach().to(torch.float64)
        b = b.to(torch.float64)
        if a.shape != b.shape:
            rows.append((name, float("nan"), float("nan"), False, f"shape {tuple(a.shape)} != {tuple(b.shape)}"))
            continue
        abs_diff = (a - b).abs().max().item() if a.numel() else 0.0
        rel = abs_diff / max(b.abs().max().item() if b.numel() else 0.0, TINY)
        ok = rel <= rtol  # NaN fails
        rows.append((name, abs_diff, rel, ok, ""))
    extra = sorted(k for k in dump if k.startswith("grad.") and k not in expected)
    rows += [(k, float("nan"), float("nan"), False, "no such parameter in the reference") for k in extra]
    if verbose:
        print(f"  {'tensor':<34} {'max|a-b|':>10} {'rel':>10}  result")
        for name, abs_diff, rel, ok, note in rows:
            print(f"  {name:<34} {abs_diff:10.3e} {rel:10.3e}  {'PASS' if ok else 'FAIL'} {note}".rstrip())
    return rows


def check_flavour(path, args):
    """Returns (all tensors match, every planted error caught)."""
    print(f"== {os.path.basename(path)}")
    if not os.path.exists(path):
        print(f"  FAIL: {path} was not written; run `{args.tests_binary} -ts=reference_dump` with "
              f"LIGHTRON_DUMP_DIR set and check that the reference_dump test suite exists")
        return False, False
    dump = torch.load(path)
    dtype = dump["logits"].dtype
    rtol = args.rtol if args.rtol is not None else TOLERANCE.get(dtype)
    if rtol is None:
        print(f"  FAIL: no default tolerance for {dtype} dumps; pass --rtol")
        return False, False
    cfg = config_from_dump(dump)
    print("  config: " + " ".join(f"{k}={v}" for k, v in sorted(cfg.items())))
    print(f"  batch {tuple(dump['tokens'].shape)}, dumped dtype {dtype}, reference computed in "
          f"{args.ref_dtype}")
    ref_dtype = getattr(torch, args.ref_dtype)
    model, problems = model_from_dump(dump, ref_dtype)
    if problems:
        for p in problems:
            print(f"  FAIL: {p}")
        print("  hint: parameter names and shapes must be exactly those listed in tests/gpt_reference.py")
        return False, False
    rows = compare(dump, run_reference(model, dump), rtol, verbose=True)
    failed = [r for r in rows if not r[3]]
    worst = max(rows, key=lambda r: r[2] if r[2] == r[2] else float("inf"))
    print(f"  tolerance: rel = max|cpp - ref| / max(max|ref|, {TINY:g}) <= {rtol:g} per tensor "
          f"({dtype} dump)")
    print(f"  {len(rows) - len(failed)}/{len(rows)} tensors match; worst {worst[0]} rel {worst[2]:.3e}"
          + ("" if not failed else f"; FAILED: {', '.join(r[0] for r in failed)}"))
    caught = check_planted_errors(dump, cfg, ref_dtype, rtol)
    return not failed, caught


# ---- planted errors: the comparison must be able to fail ------------------------------

def swap_q_and_k(model):
    """Swaps query head 0 and key group 0 (D rows each) in h.0.attn.c_attn.weight."""
    w, D = model.h[0].attn.c_attn.weight, model.h[0].attn.D
    H = model.h[0].attn.H
    q0, k0 = w[:D].clone(), w[H * D:H * D + D].clone()
    w[:D], w[H * D:H * D + D] = k0, q0


def swap_layer_mlps(model):
    """Swaps the MLP weights of layers 0 and 1."""
    a, b = model.h[0].mlp, model.h[1].mlp
    for name in ("c_fc", "c_proj"):
        wa, wb = getattr(a, name).weight, getattr(b, name).weight
        tmp = wa.clone()
        wa.copy_(wb)
        wb.copy_(tmp)


@contextlib.contextmanager
def negated_rotary():
    """RoPE turning the wrong way: sin -> -sin."""
    original = ref.rotary_tables

    def wrong(*a, **k):
        cos, sin = original(*a, **k)
        return cos, -sin
    ref.rotary_tables = wrong
    try:
        yield
    finally:
        ref.rotary_tables = original


def check_planted_errors(dump, cfg, ref_dtype, rtol):
    plants = [("Q head 0 <-> K group 0 rows of h.0.attn.c_attn.weight", swap_q_and_k, None)]
    if cfg["num_layers"] >= 2:
        plants.append(("h.0.mlp <-> h.1.mlp weights", swap_layer_mlps, None))
    if cfg["position_embedding_type"] == "rope":
        plants.append(("rotary sign negated", None, negated_rotary))
    all_caught = True
    for label, edit, context in plants:
        model, _ = model_from_dump(dump, ref_dtype)
        if edit:
            with torch.no_grad():
                edit(model)
        with context() if context else contextlib.nullcontext():
            rows = compare(dump, run_reference(model, dump), rtol, verbose=False)
        failing = [r for r in rows if not r[3]]
        caught = bool(failing)
        all_caught &= caught
        worst = max(r[2] for r in rows)
        print(f"  planted error: {label:<55} {len(failing):3d} tensors differ, worst rel "
              f"{worst:.2e}  {'caught' if caught else 'NOT CAUGHT (FAIL)'}")
    return all_caught


# ---- the self-test: dumps written by the Python model --------------------------------

SELF_TEST_CONFIGS = {
    "gpt2": dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=64,
                 max_position_embeddings=16),
    "llama": dict(ref.LLAMA_OVERRIDES, num_layers=2, hidden_size=32, num_attention_heads=4,
                  num_query_groups=2, ffn_hidden_size=48, seq_length=8, vocab_size=64),
}


def write_dump(path, cfg, seed, batch=2):
    """What the C++ dumper writes, produced by the Python model in fp32."""
    torch.manual_seed(seed)
    model = ref.GPT(cfg)
    with torch.no_grad():  # norms away from ones/zeros so their layout is tested too
        for n, p in model.named_parameters():
            if "ln_" in n:
                p.add_(0.1 * torch.randn_like(p))
    c = model.config
    tokens = torch.randint(c["vocab_size"], (batch, c["seq_length"]))
    labels = torch.randint(c["vocab_size"], (batch, c["seq_length"]))
    logits = model(tokens)
    loss = model.loss_of(logits, labels)
    loss.backward()
    d = {}
    for k, v in c.items():
        if k in STRING_CODES:
            v = STRING_CODES[k].index(v)
        d[f"config.{k}"] = torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else torch.int64)
    d.update({f"param.{n}": p.detach() for n, p in model.named_parameters()})
    d.update({"tokens": tokens, "labels": labels, "logits": logits.detach(), "loss": loss.detach()})
    d.update({f"grad.{n}": p.grad for n, p in model.named_parameters()})
    torch.save(d, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tests-binary", help="lightron_tests, which has the reference_dump test suite")
    parser.add_argument("--workdir", help="where the dumps are written (created if missing)")
    parser.add_argument("--rtol", type=float, default=None, help="override the per-dtype tolerance")
    parser.add_argument("--ref-dtype", default="float64", choices=("float64", "float32"))
    parser.add_argument("--self-test", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with contextlib.ExitStack() as stack:
        if args.self_test:
            args.workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
            os.makedirs(args.workdir, exist_ok=True)
            for flavour, cfg in SELF_TEST_CONFIGS.items():
                write_dump(os.path.join(args.workdir, f"{flavour}.pt"), cfg, seed=1234)
            print(f"self-test: dumps written by the Python model (fp32) in {args.workdir}")
        else:
            if not args.tests_binary or not args.workdir:
                parser.error("--tests-binary and --workdir are required (or --self-test)")
            os.makedirs(args.workdir, exist_ok=True)
            for flavour in FLAVOURS:  # never compare against a stale dump
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(args.workdir, f"{flavour}.pt"))
            cmd = [args.tests_binary, "-ts=reference_dump"]
            env = dict(os.environ, LIGHTRON_DUMP_DIR=args.workdir)
            result = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if result.returncode != 0:
                print(result.stdout)
                print(f"FAIL: `LIGHTRON_DUMP_DIR={args.workdir} {' '.join(cmd)}` exited {result.returncode}")
                return 1

        results = {f: check_flavour(os.path.join(args.workdir, f"{f}.pt"), args) for f in FLAVOURS}
    print("== summary")
    for f, (match, caught) in results.items():
        print(f"  {f:<6} C++ vs reference: {'PASS' if match else 'FAIL'}   "
              f"planted errors caught: {'yes' if caught else 'NO'}")
    ok = all(m and c for m, c in results.values())
    print("reference check " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
