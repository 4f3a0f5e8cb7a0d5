"""Item 2: ToMe encoders merging to their target K against no merging (K = L), same weights.

For each variant (paper G+R: CNN stages then 12 ToMe blocks at width 512, L = 256 -> K = 144;
paper R: ViT-B, L = 256 -> K = 36) one batch of 256-px images (the digits, upsampled) goes
through the encoder without gradients: images/s of each side, and the ratio of their FLOPs
(torch.utils.flop_counter via `mergevq.eval.flops.count_macs`, counted on the meta device: shapes
only). speed-up = time without merging / time with; FLOPs ratio = FLOPs without / with;
efficiency = speed-up / FLOPs ratio (1.0: every FLOP saved is time saved).
CUDA: bf16 autocast, and with --compile the encoder is torch.compile'd (each K its own graph).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from mergevq.bench.report import Goal, ItemResult
from mergevq.bench.scale import BenchScale
from mergevq.bench.timing import alternate, profile_top
from mergevq.data import digits_arrays
from mergevq.data.datasets import to_unit_range
from mergevq.eval.flops import count_macs
from mergevq.tokenizer import build_tokenizer


def digit_images(batch: int, resolution: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `batch` validation digits (8 x 8) upsampled bilinearly to `resolution`, as
    (B, 3, R, R) in [-1, 1], and their labels (B,). Only the batch is upsampled."""
    images, labels = digits_arrays(resolution=8, split="val")
    if batch > len(images):
        raise ValueError(f"bench asks for {batch} images; the digits validation split has {len(images)}")
    x = F.interpolate(to_unit_range(images[:batch]), size=(resolution, resolution), mode="bilinear",
                      align_corners=False)
    return x.clamp(-1, 1).to(device), labels[:batch].to(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the GPU mode), nothing on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def encoder_macs(variant: str, batch: int, kept: int) -> int:
    """MACs of one encoder forward of `batch` images at kept count K (meta device: shapes only)."""
    with torch.device("meta"):
        model = build_tokenizer(variant, dinov2_init=False)
        images = torch.zeros(batch, 3, model.resolution, model.resolution)
        return count_macs(model.encoder, images, kept)


def measure_variant(variant: str, batch: int, repeats, device: torch.device, compile_: bool) -> dict:
    torch.manual_seed(0)
    model = build_tokenizer(variant, dinov2_init=False)
    encoder = model.encoder.to(device).eval()
    kept, tokens = model.config.kept, model.num_tokens
    images, _ = digit_images(batch, model.resolution, device)
    call = torch.compile(encoder) if compile_ else encoder

    def forward(k: int):
        def run():
            with torch.no_grad(), autocast(device):
                return call(images, k)
        return run

    sides = {"merge": forward(kept), "none": forward(tokens)}
    times = alternate(sides, repeats, device)
    macs = {"merge": encoder_macs(variant, batch, kept), "none": encoder_macs(variant, batch, tokens)}
    speedup = times["none"].median / times["merge"].median
    per_round = [n / m for m, n in zip(times["merge"].samples, times["none"].samples)]
    flops_ratio = macs["none"] / macs["merge"]
    return {"kept": kept, "tokens": tokens, "batch": batch, "resolution": model.resolution,
            "speedup": speedup, "speedup_per_round": {"min": min(per_round), "max": max(per_round)},
            "flops_ratio": flops_ratio, "efficiency": speedup / flops_ratio,
            "images_per_s": {k: batch / t.median for k, t in times.items()},
            "gmacs": {k: v / 1e9 for k, v in macs.items()},
            "time": {k: t.as_dict() for k, t in times.items()}, "sides": sides}


def run(scale: BenchScale, device: torch.device, compile_: bool = False) -> ItemResult:
    batch = scale.tome_batch_cpu if device.type == "cpu" else scale.tome_batch_cuda
    per_variant = {v: measure_variant(v, batch, scale.tome_repeats, device, compile_) for v in scale.tome_variants}
    keys = {name: {v: r[field] for v, r in per_variant.items()}
            for name, field in (("tome_speedup", "speedup"), ("tome_flops_ratio", "flops_ratio"),
                                ("tome_efficiency", "efficiency"))}
    goals = [Goal(f"tome_efficiency[{v}]", r["efficiency"], ">=", 0.9,
                  f"speed-up {r['speedup']:.3f} / FLOPs ratio {r['flops_ratio']:.3f}, "
                  f"{v} L={r['tokens']} -> K={r['kept']}")
             for v, r in per_variant.items()]
    sides = {v: r.pop("sides") for v, r in per_variant.items()}
    result = ItemResult(keys, {"compile": compile_, "variants": per_variant}, goals)
    missed = [g.key.split("[")[1].rstrip("]") for g in goals if not g.met]
    if missed:
        result.profile = {f"{v} {side}": profile_top(fn, device) for v in missed for side, fn in sides[v].items()}
    return result
