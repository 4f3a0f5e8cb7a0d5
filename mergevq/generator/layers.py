"""Transformer pieces of the LlamaGen-style generators: RMSNorm, SwiGLU, 2D RoPE, attention, KV cache.

Every generator (LlamaGen raster, MergeAR, RandAR) runs the same blocks; what differs is which
tokens go in, which RoPE position each carries, which keys each query may see, and where in the
KV cache each new token is written. So the attention here takes all three explicitly:

* RoPE per token: `rope_from_positions(pos)` with `pos` (B, T, 2) = (row, col) on the image grid,
  row = PREFIX (-1) for prefix tokens (class, merge instruction). LlamaGen's 2D RoPE: of the
  head_dim / 2 rotary pairs, the first half rotate with the row index and the second half with
  the column index (frequencies base^(-2i / (head_dim / 2))); adjacent channels (2i, 2i+1) form a
  pair. Prefix tokens have cos = sin = 0, so their q and k are ZEROED, not left unrotated
  (LlamaGen's `cls_token_num` zero rows; RandAR's `zero_class_qk`).
* An optional boolean mask (B, T, S): True = the query may attend to that key.
* A static `KVCache` holding keys AFTER RoPE, written at arbitrary per-sample slots, so a caller
  can keep the cache dense (LlamaGen), overwrite a slot (MergeAR's pruned cache: a duplicate token
  is written at the next free slot, attended to by itself, and overwritten by the next token) or
  grow it (MergeAR when a sample has more than K distinct tokens).

Follows LlamaGen (FoundationVision/LlamaGen, autoregressive/models/gpt.py) for the block
(pre-norm, RMSNorm eps 1e-5 in fp32, SwiGLU hidden = find_multiple(2 * 4 * dim / 3, 256), no
biases, residual and FFN dropout).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

PREFIX = -1  # row value that marks a prefix token (class / instruction): cos = sin = 0


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n (LlamaGen's FFN rounding)."""
    return n if n % k == 0 else n + k - n % k


def swiglu_hidden(dim: int, multiple_of: int) -> int:
    """LlamaGen's SwiGLU width: find_multiple(int(2 * 4 * dim / 3), multiple_of); 2816 at dim 1024."""
    return find_multiple(int(2 * 4 * dim / 3), multiple_of)


# ---------------------------------------------------------------------------------------------
# Norm, FFN


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (LLaMA): x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases, dropout on the output (LlamaGen's ffn_dropout)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


# ---------------------------------------------------------------------------------------------
# 2D RoPE


class Rope(NamedTuple):
    """cos and sin per token and rotary pair, (B, T, head_dim // 2) fp32 each."""

    cos: Tensor
    sin: Tensor


def rope_from_positions(pos: Tensor, head_dim: int, base: float = 10000.0) -> Rope:
    """2D RoPE tables for per-token grid positions.

    pos: (B, T, 2) long, (row, col); row == PREFIX marks a prefix token (cos = sin = 0).
    Returns Rope with (B, T, head_dim // 2): pairs [0, head_dim // 4) rotate with the row,
    pairs [head_dim // 4, head_dim // 2) with the column (LlamaGen's precompute_freqs_cis_2d).
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device=pos.device)[:quarter].float() / half))
    pos_f = pos.clamp_min(0).float()
    angles = torch.cat([pos_f[..., :1] * freqs, pos_f[..., 1:] * freqs], dim=-1)  # (B, T, half)
    live = (pos[..., :1] != PREFIX).float()  # (B, T, 1): 0 zeroes the prefix's q and k
    return Rope(torch.cos(angles) * live, torch.sin(angles) * live)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate adjacent channel pairs. x: (B, T, H, head_dim); rope: (B, T, head_dim // 2). fp32 out."""
    xs = rearrange(x.float(), "b t h (p two) -> b t h p two", two=2)  # (B, T, H, hd/2, 2)
    cos, sin = rope.cos[:, :, None], rope.sin[:, :, None]  # (B, T, 1, hd/2)
    x0, x1 = xs[..., 0], xs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return rearrange(out, "b t h p two -> b t h (p two)").type_as(x)


def grid_positions(index: Tensor, grid: int) -> Tensor:
    """Raster index -> (row, col) on a grid of side `grid`. index (...) long -> (..., 2) long."""
    return torch.stack([index // grid, index % grid], dim=-1)


def prefix_positions(batch: int, count: int, device=None) -> Tensor:
    """(batch, count, 2) positions of `count` prefix tokens (all PREFIX)."""
    return torch.full((batch, count, 2), PREFIX, dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Static per-layer key/value buffers (B, H, S, head_dim); keys are stored after RoPE.

    Tokens are written at explicit per-sample slots (`write`); which slots a query may read is the
    caller's mask, so the cache can be dense (raster decoding) or pruned and ragged (MergeAR).
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, size: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (batch, n_head, size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]

    @property
    def size(self) -> int:
        return self.k[0].shape[2]

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """slots: (B, T) long; k, v: (B, H, T, head_dim). Slot values must be < size."""
        b = torch.arange(slots.shape[0], device=slots.device)[:, None]  # (B, 1)
        # advanced indices (b, slots) broadcast to (B, T) and go first: target (B, T, H, hd)
        self.k[layer][b, :, slots] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][b, :, slots] = v.transpose(1, 2).to(self.v[layer].dtype)

    def read(self, layer: int, length: int) -> tuple[Tensor, Tensor]:
        """The first `length` slots: (B, H, length, head_dim) each."""
        return self.k[layer][:, :, :length], self.v[layer][:, :, :length]

    def grow(self, extra: int) -> None:
        """Append `extra` empty slots to every layer's buffers."""
        for buf in (self.k, self.v):
            for i, t in enumerate(buf):
                pad = t.new_zeros(t.shape[0], t.shape[1], extra, t.shape[3])
                buf[i] = torch.cat([t, pad], dim=2)


class CacheStep(NamedTuple):
    """Where a forward step writes into / reads from a KVCache."""

    cache: KVCache
    slots: Tensor  # (B, T) long: cache slot of each new token
    length: int  # attend over cache slots [0, length)


# ---------------------------------------------------------------------------------------------
# Attention, block


class Attention(nn.Module):
    """Multi-head self-attention with per-token RoPE, an explicit boolean mask and a KV cache."""

    def __init__(self, dim: int, n_head: int, attn_dropout: float = 0.0, resid_dropout: float = 0.0):
        super().__init__()
        if dim % n_head:
            raise ValueError(f"dim {dim} is not divisible by n_head {n_head}")
        self.n_head, self.head_dim = n_head, dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout = attn_dropout
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x: Tensor, rope: Rope | None, mask: Tensor | None,
                cache: CacheStep | None = None, layer: int = 0) -> Tensor:
        """x: (B, T, dim); mask: (B, T, S) bool or None (= causal over x; not allowed with a cache)."""
        q, k, v = rearrange(self.wqkv(x), "b t (three h d) -> three b t h d", three=3, h=self.n_head)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if cache is not None:
            if mask is None:
                raise ValueError("attention with a KV cache needs an explicit mask")
            cache.cache.write(layer, cache.slots, k, v)
            k, v = (t.to(q.dtype) for t in cache.cache.read(layer, cache.length))  # (B, H, S, hd)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask[:, None],
            is_causal=mask is None, dropout_p=self.attn_dropout if self.training else 0.0)
        out = rearrange(out, "b h t d -> b t (h d)")
        return self.resid_dropout(self.wo(out))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + ffn(norm(.)) (LlamaGen)."""

    def __init__(self, dim: int, n_head: int, ffn_hidden: int, norm_eps: float = 1e-5,
                 attn_dropout: float = 0.0, resid_dropout: float = 0.0, ffn_dropout: float = 0.0):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, n_head, attn_dropout, resid_dropout)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = SwiGLU(dim, ffn_hidden, ffn_dropout)

    def forward(self, x: Tensor, rope: Rope | None, mask: Tensor | None,
                cache: CacheStep | None = None, layer: int = 0) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))
