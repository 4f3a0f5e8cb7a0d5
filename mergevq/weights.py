"""Pretrained weights as local files.

Nothing downloads at run time: every model that needs pretrained weights (DINOv2-Base teacher,
LPIPS' VGG16 trunk, torch-fidelity's Inception-v3, ADM's reference batch) loads a local file named
in the config's ``weights:`` block. ``mergevq fetch-weights`` downloads them once, on a machine with
internet (e.g. a cluster login node).
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from mergevq.config import REPO_ROOT, load_config


class MissingWeightsError(FileNotFoundError):
    """A pretrained-weight file named in the config is absent."""


# key -> (what it is, how fetch-weights gets it)
WEIGHT_SOURCES = {
    "dinov2_base": ("DINOv2-Base (timm vit_base_patch14_dinov2.lvd142m) state_dict", "timm"),
    "vgg16": ("torchvision VGG16 IMAGENET1K_V1 state_dict (LPIPS trunk)", "torchvision"),
    "inception": (
        "torch-fidelity Inception-v3 (inception-v3-compat) weights",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    ),
    "adm_reference": (
        "ADM reference batch for ImageNet 256 (mu/sigma of TF-Inception pool3)",
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz",
    ),
}


def resolve(path: str | Path) -> Path:
    """Config paths are relative to the repository root."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def require_weight(cfg: dict, key: str) -> Path:
    """The local file for ``weights.<key>``; a clear error naming the path if it is unset or missing."""
    if key not in WEIGHT_SOURCES:
        raise KeyError(f"unknown weights key {key!r} (known: {sorted(WEIGHT_SOURCES)})")
    value = cfg.get("weights", {}).get(key)
    what = WEIGHT_SOURCES[key][0]
    if not value:
        raise MissingWeightsError(
            f"weights.{key} is not set in the config, but this step needs {what}. "
            f"Set weights.{key} to a local file and run `mergevq fetch-weights --config <config>` "
            "on a machine with internet."
        )
    path = resolve(value)
    if not path.is_file():
        raise MissingWeightsError(
            f"weights.{key}: file not found: {path} ({what}). "
            "Run `mergevq fetch-weights --config <config>` once on a machine with internet "
            "(e.g. a login node) to download it there."
        )
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_one(key: str, dest: Path) -> None:
    import torch

    from mergevq.files import atomic_path, torch_save

    source = WEIGHT_SOURCES[key][1]
    if source == "timm":
        import timm

        model = timm.create_model("vit_base_patch14_dinov2.lvd142m", pretrained=True, num_classes=0)
        torch_save(model.state_dict(), dest)
    elif source == "torchvision":
        from torchvision.models import VGG16_Weights, vgg16

        torch_save(vgg16(weights=VGG16_Weights.IMAGENET1K_V1).state_dict(), dest)
    else:
        with atomic_path(dest) as tmp:
            torch.hub.download_url_to_file(source, str(tmp), progress=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config whose weights: block names the files")
    parser.add_argument("--only", nargs="*", choices=sorted(WEIGHT_SOURCES), help="fetch only these keys")
    parser.add_argument("--force", action="store_true", help="download even if the file exists")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    for key in args.only or sorted(WEIGHT_SOURCES):
        value = cfg["weights"].get(key)
        if not value:
            print(f"weights.{key}: not set in {args.config}, skipped")
            continue
        dest = resolve(value)
        if dest.is_file() and not args.force:
            print(f"weights.{key}: {dest} exists (sha256 {sha256_file(dest)[:12]}), kept")
            continue
        print(f"weights.{key}: downloading {WEIGHT_SOURCES[key][0]} -> {dest}")
        _fetch_one(key, dest)
        print(f"weights.{key}: done (sha256 {sha256_file(dest)[:12]})")
    return 0
