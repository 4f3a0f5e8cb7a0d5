"""Merge-ratio sampling for stage-1 training (App. A.3, Eq. 19/20, Fig. 5).

Each training step draws the kept token count K, and the encoder merges L -> K tokens. K is always
a perfect square because merged tokens are laid out on a sqrt(K) x sqrt(K) grid:

    K = (k0 + T)^2,   T ~ discrete exponential (Eq. 19) or discrete Gaussian (Eq. 20),

truncated to k_min <= K <= k_max and renormalised.

Sign convention. App. A.3 writes K = (16 - T)^2 for the G version, but Fig. 5(b) shows G's kept
counts running from 256 *up* to 1024 (stage 2) and over [225, 400] (stage 1), and the R version is
written (6 + T)^2, G+R (12 + T)^2. We therefore use K = (k0 + T)^2 throughout; the direction of the
exponential's tail is set by where [k_min, k_max] lies relative to k0^2.

Determinism. `sample(step, seed)` seeds a fresh numpy Generator from (seed, step), so every DDP rank
draws the same K without communicating, and a resumed run draws exactly the K the uninterrupted run
would have drawn at that step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

DISTRIBUTIONS = ("gaussian", "exponential", "fixed")


def _is_square(n: int) -> bool:
    return n >= 1 and math.isqrt(n) ** 2 == n


@dataclass(frozen=True)
class MergeRatioSampler:
    """Distribution over kept token counts K = (k0 + T)^2 within [k_min, k_max].

    distribution: "gaussian" (Eq. 20, uses mu, sigma), "exponential" (Eq. 19, uses lam, T >= 0),
    or "fixed" (T = 0 always, K = k0^2).
    """

    distribution: str
    k0: int
    k_min: int
    k_max: int
    mu: float = 0.0
    sigma: float = 1.0
    lam: float = 1.0

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"merge_sampling.distribution {self.distribution!r} is not one of {DISTRIBUTIONS}")
        for name in ("k_min", "k_max"):
            if not _is_square(getattr(self, name)):
                raise ValueError(f"merge_sampling.{name}={getattr(self, name)} is not a positive perfect square")
        if self.k_min > self.k_max:
            raise ValueError(f"merge_sampling: k_min {self.k_min} > k_max {self.k_max}")
        if self.k0 < 1:
            raise ValueError(f"merge_sampling.k0={self.k0} must be >= 1")
        if self.distribution == "gaussian" and not self.sigma > 0:
            raise ValueError(f"merge_sampling.sigma={self.sigma} must be > 0")
        if self.distribution == "exponential" and not self.lam > 0:
            raise ValueError(f"merge_sampling.lam={self.lam} must be > 0")
        if not self.support():
            raise ValueError(
                f"merge_sampling: no kept count (k0 + T)^2 with k0={self.k0} and "
                f"{'T >= 0' if self.distribution == 'exponential' else 'T = 0' if self.distribution == 'fixed' else 'integer T'} "
                f"lies in [{self.k_min}, {self.k_max}]"
            )

    @classmethod
    def from_config(cls, ms: Mapping[str, Any]) -> "MergeRatioSampler":
        """Build from a `tokenizer.variants.<v>.merge_sampling` config block."""
        known = {"distribution", "k0", "k_min", "k_max", "mu", "sigma", "lam"}
        unknown = set(ms) - known
        if unknown:
            raise ValueError(f"merge_sampling: unknown key(s) {sorted(unknown)}")
        return cls(**dict(ms))

    # -- the distribution -------------------------------------------------------------------
    def _t_values(self) -> list[int]:
        """All T with K = (k0 + T)^2 in [k_min, k_max] and k0 + T >= 1 (one T per square)."""
        lo, hi = math.isqrt(self.k_min), math.isqrt(self.k_max)
        ts = range(lo - self.k0, hi - self.k0 + 1)  # roots k0 + T run over [lo, hi]
        if self.distribution == "exponential":
            return [t for t in ts if t >= 0]  # Eq. (19) is defined for k >= 0
        if self.distribution == "fixed":
            return [t for t in ts if t == 0]
        return list(ts)

    def _log_weight(self, t: int) -> float:
        if self.distribution == "exponential":
            # Eq. (19): P(T=k) = (1 - e^-lam) e^(-lam k); the constant cancels on renormalising.
            return -self.lam * t
        if self.distribution == "gaussian":
            # Eq. (20): P(T=k) proportional to exp(-(k - mu)^2 / (2 sigma^2)), k integer.
            return -((t - self.mu) ** 2) / (2.0 * self.sigma**2)
        return 0.0

    def support(self) -> list[int]:
        """Kept counts K with non-zero probability, ascending."""
        return sorted((self.k0 + t) ** 2 for t in self._t_values())

    def probabilities(self) -> dict[int, float]:
        """{K: P(K)} after truncation to [k_min, k_max] and renormalisation (sums to 1)."""
        ts = self._t_values()
        logw = np.array([self._log_weight(t) for t in ts], dtype=np.float64)
        w = np.exp(logw - logw.max())  # stable for tiny sigma / large lam
        p = w / w.sum()
        return {(self.k0 + t) ** 2: float(pi) for t, pi in sorted(zip(ts, p), key=lambda x: (self.k0 + x[0]) ** 2)}

    def mode(self) -> int:
        probs = self.probabilities()
        return max(probs, key=probs.get)

    def sample(self, step: int, seed: int) -> int:
        """The kept count for training step `step`: a pure function of (seed, step).

        Inverse-CDF draw from numpy's PCG64 seeded by SeedSequence([seed, step]), so ranks agree
        without communication and resume is exact.
        """
        if step < 0 or seed < 0:
            raise ValueError(f"step ({step}) and seed ({seed}) must be non-negative")
        probs = self.probabilities()
        ks = list(probs)
        if len(ks) == 1:
            return ks[0]
        cdf = np.cumsum([probs[k] for k in ks])
        u = np.random.default_rng([int(seed), int(step)]).random()
        i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        return ks[min(i, len(ks) - 1)]
