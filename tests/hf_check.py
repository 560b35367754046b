#!/usr/bin/python3
"""hf_check.py — lightron's HuggingFace export, checked against HF's own conventions.

    /usr/bin/python3 tests/hf_check.py --build BUILD_DIR --workdir DIR [--port 29995]

1. `mpirun -np 4 lightron_tests -ts=reference_hf_dump` trains a GPT-2 and a Llama for 3 steps
   as tp 2 x pp 2, saves each (DIR/ckpt_<flavour>) and dumps its logits on a batch
   (DIR/logits_<flavour>.safetensors: tokens (1, T), logits (1, T, V)).
2. `convert_checkpoint --load DIR/ckpt_<flavour> --export-hf DIR/hf_<flavour>`.
3. Here, without lightron: reads config.json and model.safetensors (a small pure-Python
   reader), runs HF's GPT2LMHeadModel / LlamaForCausalLM forward as HF's modeling code does
   it (Conv1D weights (in, out); q/k/v/o and gate/up/down projections, rotate_half RoPE,
   repeat_kv), in fp64, and requires max |logits - lightron's| <= 1e-4.
   Planted errors (GPT-2: a square Conv1D weight used untransposed; Llama: interleaved RoPE, as
   Meta's original code) must be caught, so the check can fail.
4. `convert_checkpoint --import-hf DIR/hf_<flavour> --save DIR/imported_<flavour>`, then
   `lightron_tests -ts=reference_hf_import`: the C++ side loads the HF directory and the
   imported checkpoint and must reproduce the same logits (<= 1e-4).
(transformers is not installed on these machines; this file is its reference.)
Exit 0 when everything matches and every planted error is caught, 1 otherwise.
"""
import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys

import torch

TOLERANCE = 1e-4
DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
          "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8}


def read_safetensors(path):
    """{name: tensor} of a safetensors file: u64 header size, JSON header, raw data."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        buf = bytearray(data[8 + n + begin:8 + n + end])
        t = torch.frombuffer(buf, dtype=DTYPES[e["dtype"]]) if buf else torch.empty(0, dtype=DTYPES[e["dtype"]])
        out[name] = t.reshape(e["shape"])
    return out


# ---- HF GPT-2 (modeling_gpt2.GPT2LMHeadModel), eval mode -----------------------------------

def conv1d(x, w, b):  # HF Conv1D: y = x W + b with W stored (in, out)
    return x @ w + b


def gpt2_forward(cfg, sd, ids, plant=None):
    C, H = cfg["n_embd"], cfg["n_head"]
    D = C // H
    T = ids.shape[1]
    def w(name):  # planted error: attn.c_proj (square, so shapes still fit) read as nn.Linear's (out, in)
        return sd[name].t() if plant == "untransposed" and name.endswith("attn.c_proj.weight") else sd[name]

    h = sd["transformer.wte.weight"][ids] + sd["transformer.wpe.weight"][:T]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    ln = lambda x, p: torch.nn.functional.layer_norm(x, (C,), sd[p + ".weight"], sd[p + ".bias"],
                                                     cfg.get("layer_norm_epsilon", 1e-5))
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        a = conv1d(ln(h, p + "ln_1"), w(p + "attn.c_attn.weight"), sd[p + "attn.c_attn.bias"])
        q, k, v = (t.view(1, T, H, D).transpose(1, 2) for t in a.split(C, dim=2))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min).softmax(-1)
        y = (s @ v).transpose(1, 2).reshape(1, T, C)
        h = h + conv1d(y, w(p + "attn.c_proj.weight"), sd[p + "attn.c_proj.bias"])
        m = conv1d(ln(h, p + "ln_2"), w(p + "mlp.c_fc.weight"), sd[p + "mlp.c_fc.bias"])
        m = 0.5 * m * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (m + 0.044715 * m.pow(3))))  # gelu_new
        h = h + conv1d(m, w(p + "mlp.c_proj.weight"), sd[p + "mlp.c_proj.bias"])
    h = ln(h, "transformer.ln_f")
    return h @ sd.get("lm_head.weight", sd["transformer.wte.weight"]).t()  # tied


# ---- HF Llama (modeling_llama.LlamaForCausalLM), eval mode ----------------------------------

def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def llama_forward(cfg, sd, ids, plant=None):
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    G = cfg.get("num_key_value_heads", H)
    D = cfg.get("head_dim", C // H)
    T = ids.shape[1]
    eps = cfg["rms_norm_eps"]
    inv_freq = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()

    def rope(x):  # (1, heads, T, D)
        if plant == "interleaved":  # Meta's original layout: pairs (x0, x1), (x2, x3), ...
            xc = torch.view_as_complex(x.reshape(*x.shape[:-1], D // 2, 2).contiguous())
            return torch.view_as_real(xc * torch.polar(torch.ones_like(freqs), freqs)).flatten(-2)
        return x * cos + rotate_half(x) * sin

    mask = torch.ones(T, T, dtype=torch.bool).tril()
    h = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms_norm(h, sd[p + "input_layernorm.weight"], eps)
        q = (x @ sd[p + "self_attn.q_proj.weight"].t()).view(1, T, H, D).transpose(1, 2)
        k = (x @ sd[p + "self_attn.k_proj.weight"].t()).view(1, T, G, D).transpose(1, 2)
        v = (x @ sd[p + "self_attn.v_proj.weight"].t()).view(1, T, G, D).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k[:, :, None].expand(1, G, H // G, T, D).reshape(1, H, T, D)  # repeat_kv
        v = v[:, :, None].expand(1, G, H // G, T, D).reshape(1, H, T, D)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min).softmax(-1)
        y = (s @ v).transpose(1, 2).reshape(1, T, H * D)
        h = h + y @ sd[p + "self_attn.o_proj.weight"].t()
        x = rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = x @ sd[p + "mlp.gate_proj.weight"].t(), x @ sd[p + "mlp.up_proj.weight"].t()
        h = h + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].t()
    h = rms_norm(h, sd["model.norm.weight"], eps)
    head = sd["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else sd["lm_head.weight"]
    return h @ head.t()


FORWARD = {"gpt2": (gpt2_forward, "untransposed"), "llama": (llama_forward, "interleaved")}


def run(cmd, env=None):
    print("  $ " + " ".join(cmd))
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        print("\n".join("    | " + line for line in r.stdout.splitlines()[-30:]))
        raise SystemExit(f"FAIL: exit {r.returncode}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--port", default="29995")
    ap.add_argument("--mpirun", default="mpirun")
    args = ap.parse_args()
    tests, convert = f"{args.build}/tests/lightron_tests", f"{args.build}/examples/convert_checkpoint"
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    env = dict(os.environ, LIGHTRON_DUMP_DIR=args.workdir, OMP_NUM_THREADS="1")
    print("== 1. lightron: tp 2 x pp 2 checkpoints and logits")
    run([args.mpirun, "-np", "4", "--oversubscribe", "--allow-run-as-root", "--bind-to", "none",
         "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={args.port}", "-x", "OMP_NUM_THREADS=1",
         "-x", "LIGHTRON_DUMP_DIR", tests, "-ts=reference_hf_dump"], env)
    ok = True
    for flavour in ("gpt2", "llama"):
        w = args.workdir
        print(f"== 2. {flavour}: export")
        print(run([convert, "--load", f"{w}/ckpt_{flavour}", "--export-hf", f"{w}/hf_{flavour}"]).rstrip())
        cfg = json.load(open(f"{w}/hf_{flavour}/config.json"))
        sd = {k: v.to(torch.float64) for k, v in read_safetensors(f"{w}/hf_{flavour}/model.safetensors").items()}
        dump = read_safetensors(f"{w}/logits_{flavour}.safetensors")
        forward, plant = FORWARD[cfg["model_type"]]
        print(f"== 3. {flavour}: HF {cfg['architectures'][0]} forward in Python, {len(sd)} tensors")
        with torch.no_grad():
            diff = (forward(cfg, sd, dump["tokens"]) - dump["logits"].to(torch.float64)).abs().max().item()
            try:
                planted = (forward(cfg, sd, dump["tokens"], plant) - dump["logits"].to(torch.float64)).abs().max().item()
            except RuntimeError:  # shapes that no longer fit are caught too
                planted = math.inf
        good, caught = diff <= TOLERANCE, planted > TOLERANCE
        print(f"  max |HF logits - lightron logits| = {diff:.3e} (<= {TOLERANCE}): {'PASS' if good else 'FAIL'}")
        print(f"  planted error ({plant}): {planted:.3e}: {'caught' if caught else 'NOT CAUGHT'}")
        ok &= good and caught
        print(f"== 4. {flavour}: import")
        print(run([convert, "--import-hf", f"{w}/hf_{flavour}", "--save", f"{w}/imported_{flavour}"]).rstrip())
    print("== 5. lightron reads the HF directories and the imported checkpoints")
    out = run([tests, "-ts=reference_hf_import", "-s"], env)
    print("\n".join("  " + line for line in out.splitlines() if "max |logits" in line or "passed" in line))
    print("hf_check.py: " + ("all logits match, every planted error caught" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
