"""GPT-2 124M training throughput in PyTorch-Python on one GPU: the baseline that
bench/gpu_check.sh runs next to lightron's pretrain_gpt in the same invocation.

Same model as lightron's GPT-2 flavour (pre-norm, GELU tanh, tied embeddings, learned
positions), bf16 autocast with fp32 weights, fused causal attention, AdamW; random tokens.
Prints one JSON line. Usage: python3 bench/pytorch_gpu.py [--compile] [--iters 30]
"""
import argparse, json, math, time
import torch
import torch.nn as nn
import torch.nn.functional as F


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
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, V, T, L, C, H):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.h = nn.ModuleList(Block(C, H) for _ in range(L))
        self.ln_f = nn.LayerNorm(C)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for b in self.h:
            x = b(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    a = ap.parse_args()
    V, T, L, C, H, B = 50304, 1024, 12, 768, 12, a.micro_batch_size
    torch.manual_seed(0)
    model = GPT(V, T, L, C, H).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    step = torch.compile(model) if a.compile else model
    x = torch.randint(V, (B, T + 1), device="cuda")
    times = []
    for it in range(a.warmup + a.iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if it >= a.warmup:
            times.append(time.perf_counter() - t0)
    ms = 1000 * sum(times) / len(times)
    tokens_per_s = B * T / (ms / 1000)
    flops_per_token = 6 * n_params + 12 * L * C * T
    print(json.dumps({"impl": "pytorch-compile" if a.compile else "pytorch-eager", "tokens_per_s": tokens_per_s,
                      "ms_per_iter": ms, "mfu": tokens_per_s * flops_per_token / (a.peak_tflops * 1e12),
                      "params": n_params, "final_loss": loss.item()}))


if __name__ == "__main__":
    main()
