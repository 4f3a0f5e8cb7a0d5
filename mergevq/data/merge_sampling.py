"""Merge-ratio sampling for stage-1 training (App. A.3, Eq. 19/20, Fig. 5).

Each training step draws the kept token count K, and the encoder merges L -> K tokens. K is always
a perfect square because merged tokens are laid out on a sqrt(K) x sqrt(K) grid:

    K = (k0 + T)^2,   T ~ discrete exponential (Eq. 19) or discrete Gaussian (Eq. 20),

truncated to k_min <= K <= k_max, a floor added to every candidate's weight, and renormalised.

Floor. The authors' `generate_prob_list` (model_mergevq.py) adds a constant to every candidate's
weight before normalising: +0.05 to the Gaussian kernel exp(-(T - mu)^2 / (2 sigma^2)) (peak 1)
and +0.1 to the exponential density lam * exp(-lam T) (peak lam). It keeps the tails of Fig. 5 in
training a few percent of the time (G+R: K = 196, 225 get ~3% each instead of 3e-4 and 1e-7),
which the kept-count sweep of Table 4 / Fig. 3 evaluates. `floor` is that constant, added to those
same weights so the authors' values mean what they mean there; floor = 0 is Eq. (19)/(20) alone.

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
    or "fixed" (T = 0 always, K = k0^2). floor: added to every candidate's weight before
    normalising (the authors' 0.05 Gaussian / 0.1 exponential; see the module docstring).
    """

    distribution: str
    k0: int
    k_min: int
    k_max: int
    mu: float = 0.0
    sigma: float = 1.0
    lam: float = 1.0
    floor: float = 0.0

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
        if not (self.floor >= 0 and math.isfinite(self.floor)):
            raise ValueError(f"merge_sampling.floor={self.floor} must be a finite number >= 0")
        if not self.support():
            raise ValueError(
                f"merge_sampling: no kept count (k0 + T)^2 with k0={self.k0} and "
                f"{'T >= 0' if self.distribution == 'exponential' else 'T = 0' if self.distribution == 'fixed' else 'integer T'} "
                f"lies in [{self.k_min}, {self.k_max}]"
            )

    @classmethod
    def from_config(cls, ms: Mapping[str, Any]) -> "MergeRatioSampler":
        """Build from a `tokenizer.variants.<v>.merge_sampling` config block."""
        known = {"distribution", "k0", "k_min", "k_max", "mu", "sigma", "lam", "floor"}
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
        """log of T = t's unnormalised weight before the floor (the authors' generate_prob_list forms)."""
        if self.distribution == "exponential":
            # Eq. (19): P(T=k) proportional to e^(-lam k); weighted as the density lam e^(-lam k), the
            # scale the authors' floor is added on.
            return math.log(self.lam) - self.lam * t
        if self.distribution == "gaussian":
            # Eq. (20): P(T=k) proportional to exp(-(k - mu)^2 / (2 sigma^2)), k integer (peak 1).
            return -((t - self.mu) ** 2) / (2.0 * self.sigma**2)
        return 0.0

    def support(self) -> list[int]:
        """Kept counts K with non-zero probability, ascending."""
        return sorted((self.k0 + t) ** 2 for t in self._t_values())

    def probabilities(self) -> dict[int, float]:
        """{K: P(K)} after truncation to [k_min, k_max] and renormalisation (sums to 1)."""
        ts = self._t_values()
        logw = np.array([self._log_weight(t) for t in ts], dtype=np.float64)
        if self.floor > 0:
            w = np.exp(logw) + self.floor  # the sum is at least len(ts) * floor
        else:
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
