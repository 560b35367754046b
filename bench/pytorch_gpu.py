"""GPT-2 training throughput in PyTorch-Python on one GPU: the baseline that bench/gpu_check.sh
runs next to lightron's pretrain_gpt in the same invocation.

Same model as lightron's GPT-2 flavour (pre-norm, GELU tanh, tied embeddings, learned
positions), bf16 autocast with fp32 weights, fused causal attention, AdamW (torch.optim's
default implementation, or --fused-adamw), grad-norm clipping at 1.0; random tokens. The model
flags are pretrain_gpt's (default GPT-2 124M); --device cpu runs it in fp32 on the CPU, which is
how `bench/gpu_check.sh --cpu-dry-run` tries the script's logic without a GPU.
Prints one JSON line. Usage: python3 bench/pytorch_gpu.py [--compile] [--fused-adamw] [--iters 30]
"""
import argparse
import contextlib
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def causal_attention(q, k, v):
    if hasattr(F, "scaled_dot_product_attention"):  # PyTorch >= 2.0
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


class Block(nn.Module):
    def __init__(self, C, H):
        super().__init__()
        self.H = H
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in (q, k, v))
        y = causal_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, V, T, L, C, H):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.h = nn.ModuleList(Block(C, H) for _ in range(L))
        self.ln_f = nn.LayerNorm(C)
        for name, p in self.named_parameters():  # GPT-2's init, as lightron's
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02 / ((2 * L) ** 0.5 if "proj" in name else 1.0))

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for b in self.h:
            x = b(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--fused-adamw", action="store_true", help="torch.optim.AdamW(fused=True)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--vocab-size", type=int, default=50304)
    ap.add_argument("--num-layers", type=int, default=12)
    ap.add_argument("--hidden-size", type=int, default=768)
    ap.add_argument("--num-attention-heads", type=int, default=12)
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    a = ap.parse_args()
    V, T, L, C, H, B = a.vocab_size, a.seq_length, a.num_layers, a.hidden_size, a.num_attention_heads, a.micro_batch_size
    cuda = a.device.startswith("cuda")
    torch.manual_seed(0)
    model = GPT(V, T, L, C, H).to(a.device)
    n_params = sum(p.numel() for p in model.parameters())
    extra = {"fused": True} if a.fused_adamw else {}  # a TypeError where this PyTorch lacks it
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, **extra)
    step = torch.compile(model) if a.compile else model  # an AttributeError before PyTorch 2.0
    x = torch.randint(V, (B, T + 1), device=a.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for it in range(a.warmup + a.iters):
        sync()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            loss = step(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if it >= a.warmup:
            times.append(time.perf_counter() - t0)
    ms = 1000 * sum(times) / len(times)
    tokens_per_s = B * T / (ms / 1000)
    flops_per_token = 6 * n_params + 12 * L * C * T
    impl = "pytorch-" + ("compile" if a.compile else "eager") + ("-fused-adamw" if a.fused_adamw else "")
    print(json.dumps({"impl": impl, "tokens_per_s": tokens_per_s, "ms_per_iter": ms,
                      "mfu": tokens_per_s * flops_per_token / (a.peak_tflops * 1e12),
                      "params": n_params, "final_loss": loss.item()}))


if __name__ == "__main__":
    main()
