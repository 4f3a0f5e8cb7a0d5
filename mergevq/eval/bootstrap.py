"""Percentile bootstrap intervals of accuracies over evaluation images (NumPy only, no torch, so that
`mergevq table` can compare probes without loading a model).

A top-1 on a few hundred images moves by 2-3 points between two equally good encoders; the
intervals say how much of a difference between two rows is the sample. The rFID interval lives in
mergevq.eval.tokenizer_eval.bootstrap_fid (it needs the features, not 0/1 outcomes).
"""
from __future__ import annotations

import numpy as np

_CHUNK_ELEMENTS = 1 << 22  # resampled indices held at once (32 MiB): 50k val images x 1000 draws in chunks


def resampled_means(values: np.ndarray, num: int, seed: int) -> np.ndarray:
    """(num,) means of `values` (M,) over num resamples of the M entries with replacement."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_ELEMENTS // len(values))
    out = [values[rng.integers(0, len(values), (min(per_chunk, num - start), len(values)))].mean(axis=1)
           for start in range(0, num, per_chunk)]
    return np.concatenate(out) if out else np.empty(0)


def bootstrap_interval(correct, num: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy mean(correct) over the images. correct (M,) 0/1."""
    c = np.asarray(correct, dtype=np.float64)
    if c.ndim != 1 or len(c) == 0:
        raise ValueError(f"bootstrap_interval: expected a non-empty 1-d array, got shape {c.shape}")
    draws = resampled_means(c, num, seed)
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired_bootstrap(correct_a, correct_b, num: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Top-1 of a minus top-1 of b on the same images, with its paired percentile bootstrap interval.

    correct_a, correct_b (M,) 0/1 for the same M images in the same order: the images are resampled
    together, so what both probes find easy or hard cancels out of the difference.
    Returns (difference, low, high) as fractions.
    """
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap: need two 1-d arrays over the same images, got {a.shape} and {b.shape}")
    diff = a - b
    draws = resampled_means(diff, num, seed)
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return float(diff.mean()), float(lo), float(hi)
