"""OpenELM as a small PyTorch eager module, for the benchmark's reference (transformers has no OpenELM class).

Written from Apple's ``modeling_openelm.py`` (apple/OpenELM-270M on the Hugging Face hub): per-layer query and
key/value head counts and FFN widths, one fused ``qkv_proj`` (all query heads, then key heads, then value
heads), RMSNorm over ``head_dim`` on queries and keys before RoPE (one weight shared by the heads), grouped-query
attention (each key/value head serves ``heads / kv_heads`` consecutive query heads), a gated FFN whose fused
``proj_1`` holds the gate half first, SiLU, pre-norm residual blocks, a final RMSNorm and the output head tied to
the token embeddings. Parameter names are Apple's (``transformer.layers.{i}.attn.qkv_proj.weight``, ...), so a
``state_dict`` saved as safetensors is an OpenELM checkpoint ``qtl_jax.weights.llm_maps.load_causal_lm`` reads
(tests/test_bench_paper.py proves the logits equal our JAX decoder's that way).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int, heads: int, kv_heads: int, eps: float):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads is not a multiple of {kv_heads} key/value heads")
        self.head_dim, self.heads, self.kv_heads = head_dim, heads, kv_heads
        self.qkv_proj = nn.Linear(dim, (heads + 2 * kv_heads) * head_dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)
        self.out_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv_proj(x).view(b, t, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        self.proj_1 = nn.Linear(dim, 2 * width, bias=False)
        self.proj_2 = nn.Linear(width, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.proj_1(x).chunk(2, dim=-1)
        return self.proj_2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, dim: int, head_dim: int, heads: int, kv_heads: int, width: int, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, head_dim, heads, kv_heads, eps)
        self.ffn_norm = RMSNorm(dim, eps)
        self.ffn = FeedForward(dim, width)

    def forward(self, x, cos, sin, allowed):
        x = x + self.attn(self.attn_norm(x), cos, sin, allowed)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, vocab: int, dim: int, head_dim: int, heads: Sequence[int], kv_heads: Sequence[int],
                 widths: Sequence[int], eps: float):
        super().__init__()
        if not len(heads) == len(kv_heads) == len(widths):
            raise ValueError(f"per-layer heads {len(heads)}, kv heads {len(kv_heads)} and FFN widths {len(widths)} "
                             "must have one entry per layer each")
        self.token_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Layer(dim, head_dim, h, k, w, eps) for h, k, w in zip(heads, kv_heads, widths))
        self.norm = RMSNorm(dim, eps)


class OpenELM(nn.Module):
    """``embed(ids)``; ``forward(embeds, mask, positions)`` -> final hidden states; ``logits(hidden)`` (tied head)."""

    def __init__(self, vocab: int, dim: int, head_dim: int, heads: Sequence[int], kv_heads: Sequence[int],
                 widths: Sequence[int], eps: float = 1e-6, rope_theta: float = 10000.0):
        super().__init__()
        self.transformer = Transformer(vocab, dim, head_dim, heads, kv_heads, widths, eps)
        self.head_dim, self.rope_theta = head_dim, rope_theta
        # Apple's _init_weights: N(0, 0.02^2) for projections and the embedding table, norms at 1.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.token_embeddings(ids)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = embeds.shape[1]
        inv = 1.0 / self.rope_theta ** (torch.arange(0, self.head_dim, 2, device=embeds.device).float() / self.head_dim)
        angles = positions.float()[..., None] * inv
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, head_dim]
        cos, sin = angles.cos().to(embeds.dtype), angles.sin().to(embeds.dtype)
        causal = torch.ones(t, t, dtype=torch.bool, device=embeds.device).tril()
        allowed = (causal[None] & mask.bool()[:, None, :])[:, None]  # [B, 1, T, T]
        x = embeds
        for layer in self.transformer.layers:
            x = layer(x, cos, sin, allowed)
        return self.transformer.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.transformer.token_embeddings.weight).float()
