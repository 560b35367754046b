"""gpt_reference.py — lightron's GPT (GPT-2 and Llama flavours) in plain PyTorch.

Written from the architecture, not translated from include/lightron/gpt.hpp, so that the C++
model can be pinned to it (tests/reference_check.py) and timed against it
(bench/pytorch_gpt.py). Parameter names and layouts are lightron's, which are GPT-2's:

    wte.weight (V, C)            wpe.weight (P, C), learned positions only
    h.{i}.ln_1.{weight,bias}     bias only for LayerNorm
    h.{i}.attn.c_attn.{weight,bias}  ((H + 2G) D, C): rows [Q heads | K groups | V groups]
    h.{i}.attn.c_proj.{weight,bias}  (C, C)
    h.{i}.ln_2.*
    h.{i}.mlp.c_fc.{weight,bias}     (F, C), or (2F, C) for SwiGLU: gate rows, then up rows
    h.{i}.mlp.c_proj.{weight,bias}   (C, F)
    ln_f.*
    lm_head.weight (V, C)        only when untied; tied, the output layer reads wte.weight

Every weight is in nn.Linear layout (out, in); biases exist only with cfg["bias"].
Norms, softmax and the loss run in at least fp32; the model also runs in fp64, which is how
the reference check uses it. Leaves out: dropout, KV caches, anything about ranks.

Legend: B batch, T sequence, C channels, V vocab, L layers, H heads, G key/value groups,
D head size (C / H), F ffn size, P max positions.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

# Defaults are lightron's GPT-2 flavour; a config dict overrides them key by key.
DEFAULT_CONFIG = dict(
    num_layers=4, hidden_size=256, ffn_hidden_size=0, num_attention_heads=4,
    num_query_groups=0, seq_length=128, vocab_size=4096, normalization="LayerNorm",
    position_embedding_type="learned_absolute", swiglu=False, untie=False, bias=True,
    rotary_base=10000.0, norm_epsilon=1e-5, max_position_embeddings=0, init_method_std=0.02)

# The Llama flavour: the keys that differ from GPT-2.
LLAMA_OVERRIDES = dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                       untie=True, bias=False)


def make_config(cfg=None, **overrides):
    """A complete config: defaults, then `cfg`, then keyword overrides; zeros resolved."""
    c = dict(DEFAULT_CONFIG)
    c.update(cfg or {})
    c.update(overrides)
    unknown = set(c) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    C, H = c["hidden_size"], c["num_attention_heads"]
    c["ffn_hidden_size"] = c["ffn_hidden_size"] or 4 * C
    c["num_query_groups"] = c["num_query_groups"] or H
    c["max_position_embeddings"] = c["max_position_embeddings"] or c["seq_length"]
    if C % H or H % c["num_query_groups"]:
        raise ValueError(f"hidden_size ({C}) % heads ({H}) and heads % num_query_groups "
                         f"({c['num_query_groups']}) must both be 0")
    if c["normalization"] not in ("LayerNorm", "RMSNorm"):
        raise ValueError(f"normalization must be LayerNorm or RMSNorm, got {c['normalization']!r}")
    if c["position_embedding_type"] not in ("learned_absolute", "rope"):
        raise ValueError("position_embedding_type must be learned_absolute or rope, "
                         f"got {c['position_embedding_type']!r}")
    return c


def at_least_fp32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Norm(nn.Module):
    """LayerNorm: (x - mean) / sqrt(var + eps) * w + b.  RMSNorm: x / sqrt(mean(x²) + eps) * w."""

    def __init__(self, dim, rms, eps):
        super().__init__()
        self.rms, self.eps = rms, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if rms else nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = at_least_fp32(x)
        if self.rms:
            y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight
        else:
            y = F.layer_norm(xf, xf.shape[-1:], self.weight.to(xf.dtype), self.bias.to(xf.dtype), self.eps)
        return y.to(x.dtype)


def rotary_tables(T, D, base, dtype, device):
    """cos and sin of the angle t·θ_i, θ_i = base^(-2i/D), i < D/2, each (T, D/2).
    The angles are computed in fp32 (as HuggingFace and lightron do) so long sequences agree."""
    theta = base ** (-(torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))  # (D/2)
    angle = torch.arange(T, dtype=torch.float32, device=device)[:, None] * theta[None, :]  # (T, D/2)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rotate(x, cos, sin):
    """RoPE, HuggingFace "rotate_half" convention: the pair (x_i, x_{i+D/2}) turns by t·θ_i.
    x: (B, n, T, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    """Causal self-attention with H query heads sharing G key/value groups (head h uses group
    h // (H/G)); y = c_proj(softmax(q kᵀ / sqrt(D) + mask) v)."""

    def __init__(self, c):
        super().__init__()
        self.H, self.G = c["num_attention_heads"], c["num_query_groups"]
        self.D = c["hidden_size"] // self.H
        self.rope, self.base = c["position_embedding_type"] == "rope", c["rotary_base"]
        C = c["hidden_size"]
        self.c_attn = nn.Linear(C, (self.H + 2 * self.G) * self.D, bias=c["bias"])
        self.c_proj = nn.Linear(self.H * self.D, C, bias=c["bias"])

    def forward(self, x):  # (B, T, C)
        B, T, _ = x.shape
        H, G, D = self.H, self.G, self.D
        q, k, v = self.c_attn(x).split([H * D, G * D, G * D], dim=-1)
        q = q.reshape(B, T, H, D).permute(0, 2, 1, 3)  # (B, H, T, D)
        k = k.reshape(B, T, G, D).permute(0, 2, 1, 3)  # (B, G, T, D)
        v = v.reshape(B, T, G, D).permute(0, 2, 1, 3)  # (B, G, T, D)
        if self.rope:
            cos, sin = rotary_tables(T, D, self.base, x.dtype, x.device)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # Consecutive heads share a group: view the H heads as (G, H/G) and broadcast k, v.
        q = q.reshape(B, G, H // G, T, D)
        scores = torch.einsum("bgntd,bgsd->bgnts", at_least_fp32(q), at_least_fp32(k)) / math.sqrt(D)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # query t sees s <= t
        probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1).to(v.dtype)
        y = torch.einsum("bgnts,bgsd->bgntd", probs, v)  # (B, G, H/G, T, D)
        return self.c_proj(y.reshape(B, H, T, D).permute(0, 2, 1, 3).reshape(B, T, H * D))


class MLP(nn.Module):
    """GELU (tanh approximation): c_proj(gelu(c_fc x)).  SwiGLU: c_proj(silu(gate) * up)."""

    def __init__(self, c):
        super().__init__()
        C, Fh = c["hidden_size"], c["ffn_hidden_size"]
        self.swiglu = c["swiglu"]
        self.c_fc = nn.Linear(C, 2 * Fh if self.swiglu else Fh, bias=c["bias"])
        self.c_proj = nn.Linear(Fh, C, bias=c["bias"])

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.c_proj(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then + mlp(ln_2(·))."""

    def __init__(self, c):
        super().__init__()
        rms, eps = c["normalization"] == "RMSNorm", c["norm_epsilon"]
        self.ln_1 = Norm(c["hidden_size"], rms, eps)
        self.attn = Attention(c)
        self.ln_2 = Norm(c["hidden_size"], rms, eps)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """tokens (B, T) -> logits (B, T, V); `loss` is the mean cross-entropy over B·T tokens.

    Initialised like lightron: with the same torch.manual_seed just before construction, the
    weights are drawn in the same order from the same generator (normal(0, std); std/sqrt(2L)
    for c_proj weights; zero biases; unit norms)."""

    def __init__(self, cfg=None):
        super().__init__()
        c = self.config = make_config(cfg)
        rng_state = torch.get_rng_state()  # nn.Linear's own init must not move the generator
        C, rms = c["hidden_size"], c["normalization"] == "RMSNorm"
        self.wte = nn.Embedding(c["vocab_size"], C)
        if c["position_embedding_type"] == "learned_absolute":
            self.wpe = nn.Embedding(c["max_position_embeddings"], C)
        self.h = nn.ModuleList(Block(c) for _ in range(c["num_layers"]))
        self.ln_f = Norm(C, rms, c["norm_epsilon"])
        if c["untie"]:
            self.lm_head = nn.Linear(C, c["vocab_size"], bias=False)
        torch.set_rng_state(rng_state)
        self.init_weights(c["init_method_std"])

    @torch.no_grad()
    def init_weights(self, std):
        residual_std = std / math.sqrt(2 * self.config["num_layers"])
        for name, p in self.named_parameters():
            if ".ln_" in name or name.startswith("ln_"):
                continue
            if name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, residual_std if name.endswith("c_proj.weight") else std)

    def forward(self, tokens):  # (B, T) -> (B, T, V)
        T = tokens.shape[1]
        x = self.wte(tokens)
        if hasattr(self, "wpe"):
            x = x + self.wpe(torch.arange(T, device=tokens.device))
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        out = self.lm_head.weight if hasattr(self, "lm_head") else self.wte.weight
        return x @ out.t()

    @staticmethod
    def loss_of(logits, labels):
        return F.cross_entropy(at_least_fp32(logits).flatten(0, 1), labels.flatten())

    def loss(self, tokens, labels):
        return self.loss_of(self(tokens), labels)


def flops_per_token(model):
    """Training FLOPs per token, 6N + 12·L·C·T (forward + backward; N counts every parameter
    once, the tied embedding included), as used for MFU in lightron and nanoGPT."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * c["num_layers"] * c["hidden_size"] * c["seq_length"]
