"""Batched image augmentations on tensors (B, 3, H, W) in [-1, 1], for the two views of Eq. (12)
and of the demo's SimCLR teacher. All randomness comes from the global torch RNG, which training
checkpoints save and restore, so a resumed run draws the same views as an uninterrupted one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_resized_crop(images: torch.Tensor, scale=(0.4, 1.0), flip: bool = True,
                        size: int | None = None) -> torch.Tensor:
    """A square random crop covering a `scale` fraction of each image's area, resized to
    (size, size) (default: back to (H, W)) bilinearly, then flipped left-right with probability 1/2
    when `flip`. Returns (B, 3, size, size).

    flip=False for data where mirroring changes the meaning (digits: a mirrored 2 is no digit).
    """
    B, C, H, W = images.shape
    out_hw = (H, W) if size is None else (size, size)
    out = images.new_empty(B, C, *out_hw)
    for i in range(B):
        s = float(torch.empty(1).uniform_(*scale))
        h = w = max(2, int(round(math.sqrt(s) * H)))
        top = int(torch.randint(0, H - h + 1, (1,)))
        left = int(torch.randint(0, W - w + 1, (1,)))
        crop = images[i:i + 1, :, top:top + h, left:left + w]
        crop = F.interpolate(crop, size=out_hw, mode="bilinear", align_corners=False)
        if flip and bool(torch.rand(1) < 0.5):
            crop = crop.flip(-1)
        out[i] = crop[0]
    return out


def random_affine(images: torch.Tensor, degrees: float = 15.0, translate: float = 0.1) -> torch.Tensor:
    """Rotate each image by U(-degrees, degrees) and shift it by U(-translate, translate) of its
    size along each axis (bilinear resampling, border pixels repeated)."""
    B = images.shape[0]
    angle = (torch.rand(B, device=images.device) * 2 - 1) * math.radians(degrees)
    shift = (torch.rand(B, 2, device=images.device) * 2 - 1) * (2 * translate)  # grid spans [-1, 1]
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
