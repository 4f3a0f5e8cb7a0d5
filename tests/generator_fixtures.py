"""Tiny generators with random weights, shared by the generator test files."""
from __future__ import annotations

import torch

from mergevq.generator import build_generator

# 2 layers, width 32, 6-bit codes split [2, 4], a 4x4 grid, 5 classes
TINY = dict(n_layer=2, n_head=2, dim=32, multiple_of=16, n_intra_layer=2, codebook_bits=6, grid=4,
            num_classes=5)


def randomise_(model, std=0.1, seed=0):
    """Random weights everywhere, heads included: zero-initialised heads make any equivalence trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def tiny_generator(preset: str, **kw):
    return randomise_(build_generator(preset, **{**TINY, **kw}))
