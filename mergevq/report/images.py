"""Image grids: reconstructions at several kept counts (Fig. A1-style)."""
from __future__ import annotations

from pathlib import Path

import torch

from mergevq.files import atomic_path


@torch.no_grad()
def reconstruction_rows(model, images: torch.Tensor, kept_counts: list[int], device="cpu",
                        finetuned=None) -> torch.Tensor:
    """(1 + 2 * len(kept_counts)) rows of images in [-1, 1]: originals, then for each K the
    reconstruction with the encoder's S and with Source Recovery's S_hat (canonical), and a third
    row per K with the fine-tuned recovery's S_hat when `finetuned` (a FinetunedRecovery) is given.
    Returns (R*B, 3, H, W)."""
    from mergevq.tokenizer.recovery import canonical_source

    model.eval()
    x = images.to(device)
    rows = [x]
    for k in kept_counts:
        out = model(x, k)
        rows.append(out.reconstruction.float().clamp(-1, 1))
        rows.append(model.decode(out.quant.quantized, canonical_source(out.source_logits)).float().clamp(-1, 1))
        if finetuned is not None:
            rows.append(finetuned.decode(out.quant.quantized).float().clamp(-1, 1))
    return torch.cat(rows).cpu()


def save_grid(images: torch.Tensor, nrow: int, path: str | Path) -> None:
    """Save images in [-1, 1] as one PNG grid, atomically."""
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image((images + 1) / 2, tmp, nrow=nrow, padding=1, format="png")


def save_reconstruction_grid(model, images, kept_counts, path, device="cpu") -> None:
    save_grid(reconstruction_rows(model, images, kept_counts, device), len(images), path)
