"""Coverage of rFID intervals on paired Gaussian features, where every target is known.

Features x ~ N(0, I_D) ("originals") and y = x + s * noise + shift ("reconstructions"), so that
FID at infinitely many images is |shift|^2 + D (1 + (1 + s^2) - 2 sqrt(1 + s^2)). Each repetition
draws N pairs, takes `mergevq.eval.bootstrap.bootstrap_fid` (basic bootstrap of E[FID_N]) and
rebuilds from its stored numbers the two textbook intervals (percentile; basic for FID at infinity);
E[FID_N] is the mean FID over the repetitions. Prints, per interval, how often it covers E[FID_N]
and FID_inf, how often it contains its own point estimate, and its mean width.

    python benchmarks/fid_interval_coverage.py --dim 64 --images 360 --reps 200 --resamples 200
    python benchmarks/fid_interval_coverage.py --dim 64 --images 360 --noise 1.0 --shift 0.3
    python benchmarks/fid_interval_coverage.py --dim 256 --images 6000 --reps 100 --resamples 100

Measured with the same intervals (a numpy copy of these formulas; README "rFID interval"): 64-d / 360
images, s = 0.3, shift 0.05:
ours covers E[FID_N] 1.00, basic covers FID_inf 0.96, percentile 0.00 (its estimate never inside);
s = 1.0, shift 0.3: 0.98 / 0.92 / 0.00; 256-d / 6,000 images, s = 0.3: 0.97 / 0.91 / 0.00.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from mergevq.eval.bootstrap import bootstrap_fid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--images", type=int, default=360)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.3, help="s: reconstruction noise")
    parser.add_argument("--shift", type=float, default=0.05, help="mean shift per dimension")
    args = parser.parse_args()
    d, n, s = args.dim, args.images, args.noise
    fid_inf = d * args.shift**2 + d * (1 + (1 + s * s) - 2 * math.sqrt(1 + s * s))
    gen = torch.Generator().manual_seed(0)
    values, intervals = [], {"basic bootstrap of E[FID_N] (ours)": [], "percentile": [], "basic (FID_inf)": []}
    start = time.time()
    for rep in range(args.reps):
        x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        y = x + s * torch.randn(n, d, generator=gen, dtype=torch.float64) + args.shift
        r = bootstrap_fid(y, x, args.resamples, seed=rep, device="cpu")
        v, m = r.value, r.resample_mean
        values.append(v)
        intervals["basic bootstrap of E[FID_N] (ours)"].append((r.low, r.high))
        intervals["percentile"].append((v + m - r.high, v + m - r.low))  # [q_lo, q_hi]
        intervals["basic (FID_inf)"].append((r.low - (m - v), r.high - (m - v)))  # [2v - q_hi, 2v - q_lo]
    values = np.array(values)
    expected = values.mean()
    print(f"D={d} N={n} reps={args.reps} resamples={args.resamples} ({time.time() - start:.0f} s): "
          f"FID_inf {fid_inf:.4f}, E[FID_N] {expected:.4f} (sd {values.std():.4f})")
    for name, iv in intervals.items():
        iv = np.array(iv)
        cover = lambda t: np.mean((iv[:, 0] <= t) & (t <= iv[:, 1]))  # noqa: E731
        inside = np.mean((iv[:, 0] <= values) & (values <= iv[:, 1]))
        print(f"  {name:36s} covers E[FID_N] {cover(expected):.2f}, FID_inf {cover(fid_inf):.2f}, "
              f"contains its estimate {inside:.2f}, mean width {np.mean(iv[:, 1] - iv[:, 0]):.4f}")


if __name__ == "__main__":
    main()
