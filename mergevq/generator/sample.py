"""Sampling from generator logits: CFG, temperature, top-k, top-p and a per-row seeded draw.

Per-row noise: every row of a batch draws from its own stream, seeded by that row's global sample
index (`row_uniforms`), so a sample's codes do not depend on which batch (or GPU) it landed in:
batch sizes 1 and 7, 1 GPU and 8 GPUs give the same codes (VAR #61/#69: seeds shared by a batch
or a class give duplicate images). A draw is an inverse-CDF lookup with one uniform per row,
sub-token and step, so the number of draws a row makes is fixed by the sequence, not the batch.

Settings may be given per sub-token (Open-MAGVIT2 samples each sub-token with its own CFG scale
and temperature): `per_subtoken(value, k)` accepts a scalar or a length-k sequence.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class SamplingSettings(NamedTuple):
    """Sampling settings of one sub-token."""

    cfg_scale: float = 1.0
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # None or 0 = off
    top_p: float | None = None  # None or >= 1 = off


def per_subtoken(value, k: int, name: str) -> tuple:
    """Broadcast a scalar (or None) to k sub-tokens, or check a length-k sequence."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != k:
            raise ValueError(f"{name} has {len(value)} values for {k} sub-tokens: {list(value)}")
        return tuple(value)
    return (value,) * k


def sampling_settings(k: int, cfg_scale=1.0, temperature=1.0, top_k=None, top_p=None
                      ) -> tuple[SamplingSettings, ...]:
    """One SamplingSettings per sub-token; raises on invalid values."""
    out = []
    for s, t, tk, tp in zip(per_subtoken(cfg_scale, k, "cfg_scale"),
                            per_subtoken(temperature, k, "temperature"),
                            per_subtoken(top_k, k, "top_k"), per_subtoken(top_p, k, "top_p")):
        if t is None or t < 0:
            raise ValueError(f"temperature must be >= 0, got {t}")
        if tk is not None and tk < 0:
            raise ValueError(f"top_k must be >= 0 or None, got {tk}")
        if tp is not None and not 0 < tp:
            raise ValueError(f"top_p must be in (0, 1] or None, got {tp}")
        out.append(SamplingSettings(float(s), float(t), tk or None, None if tp is None or tp >= 1 else tp))
    return tuple(out)


def cfg_combine(logits: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance on a [cond; null] batch: u + s (c - u).

    logits: (2B, ...) with the conditional half first; scale: float or a tensor broadcastable
    to (B, ...). Returns (B, ...).
    """
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Top-k then top-p (nucleus) filtering; removed entries become -inf. logits: (..., V)."""
    out = logits.float()
    if top_k:
        k = min(int(top_k), out.shape[-1])
        kth = torch.topk(out, k, dim=-1).values[..., -1:]  # (..., 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass BEFORE it already reaches top_p (the top token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def row_uniforms(seeds: Tensor, count: int, device=None) -> Tensor:
    """`count` uniforms in [0, 1) per row, each row from its own torch.Generator seeded with seeds[b].

    seeds: (B,) int64. Returns (B, count) float64 on `device`.
    """
    rows = []
    for s in seeds.tolist():
        g = torch.Generator().manual_seed(int(s))
        rows.append(torch.rand(count, generator=g, dtype=torch.float64))
    return torch.stack(rows).to(device) if rows else torch.zeros(0, count, dtype=torch.float64, device=device)


def default_seeds(batch: int) -> Tensor:
    """Per-row seeds drawn from the global torch RNG (so torch.manual_seed makes a run repeatable)."""
    return torch.randint(0, 2**62, (batch,), dtype=torch.int64)


def draw(logits: Tensor, uniforms: Tensor, settings: SamplingSettings) -> Tensor:
    """Sample one index per row: temperature, top-k/top-p, inverse CDF with the given uniform.

    logits: (B, V) (already CFG-combined); uniforms: (B,) in [0, 1). Returns (B,) long.
    """
    if settings.temperature == 0:
        return logits.argmax(-1)
    scaled = filter_logits(logits.float() / settings.temperature, settings.top_k, settings.top_p)
    probs = scaled.softmax(-1).double()  # (B, V)
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]  # (B, 1)
    # first index whose cdf exceeds the target: never a zero-probability entry
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]
    return idx.clamp_max(logits.shape[-1] - 1)
