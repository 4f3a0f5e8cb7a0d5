"""The two data sources of the pipeline.

* ``digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, shipped inside
  scikit-learn, so no download), upsampled bilinearly to the demo resolution and replicated to RGB,
  with a fixed, seeded, stratified train/val split. Needs no preparation step.
* ``imagefolder``: ``{root}/train/<class>/*`` and ``{root}/val/<class>/*`` (ImageNet layout),
  resized on the shorter side and center-cropped (train: random crop + horizontal flip).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset


class DatasetError(RuntimeError):
    """A dataset that cannot be read; the message names the path."""


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) in [0, 255] -> float in [-1, 1]."""
    return images_uint8.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (..., 3, H, W) in [-1, 1] -> uint8 in [0, 255] (clamped, rounded)."""
    return images.detach().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


@lru_cache(maxsize=8)
def _digits_split(resolution: int, val_fraction: float, seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()  # (N, 3, R, R)
    y = torch.from_numpy(digits.target.astype(np.int64))
    idx = np.arange(len(y))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=y.numpy())
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])


def digits_arrays(resolution: int = 32, val_fraction: float = 0.2, seed: int = 0, split: str = "train"):
    """The digits split as (images uint8 (N, 3, R, R), labels int64 (N,)); cached per process."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train, val = _digits_split(int(resolution), float(val_fraction), int(seed))
    return train if split == "train" else val


class ImageFolderDataset(Dataset):
    """ImageNet-style tree; unreadable images raise DatasetError naming the file."""

    EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")

    def __init__(self, root: str | Path, split: str, resolution: int, train_transform: bool):
        from torchvision import transforms as T

        self.root = Path(root) / split
        if not self.root.is_dir():
            raise DatasetError(
                f"dataset directory not found: {self.root} (data.root must hold train/<class>/ and val/<class>/)"
            )
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not classes:
            raise DatasetError(f"no class folders under {self.root}")
        self.classes = classes
        self.samples = []
        for label, cls in enumerate(classes):
            images = [p for p in sorted((self.root / cls).iterdir()) if p.suffix.lower() in self.EXTENSIONS]
            if not images:  # an empty class would shift no label but leave a class never seen
                raise DatasetError(f"class folder {self.root / cls} holds no images ({', '.join(self.EXTENSIONS)})")
            self.samples += [(path, label) for path in images]
        resize = [T.Resize(resolution, antialias=True)]
        if train_transform:
            crop = [T.RandomCrop(resolution), T.RandomHorizontalFlip()]
        else:
            crop = [T.CenterCrop(resolution)]
        self.transform = T.Compose(resize + crop + [T.PILToTensor()])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return to_unit_range(self.transform(load_rgb(path))), label


def load_rgb(path: str | Path):
    """A PIL RGB image; a broken or unreadable file raises DatasetError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises many types for broken files
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def build_dataset(cfg: dict, split: str, transform: str = "eval") -> Dataset:
    """The dataset named by ``cfg['data']`` for ``split`` ('train' | 'val').

    ``transform`` is 'train' (random crop/flip on ImageFolder; digits stay as they are, since
    flipping a digit changes its class) or 'eval'.
    """
    data = cfg["data"]
    if data["dataset"] == "digits":
        images, labels = digits_arrays(data["resolution"], data["val_fraction"], cfg["seed"], split)
        if "num_classes" in data and int(labels.max()) >= data["num_classes"]:
            raise DatasetError(f"data.num_classes is {data['num_classes']} but the digits have 10 classes "
                               "(labels out of range)")
        return TensorDataset(to_unit_range(images), labels)
    if data["dataset"] == "imagefolder":
        ds = ImageFolderDataset(data["root"], split, data["resolution"], train_transform=(transform == "train"))
        # Labels are indices into the sorted class folders of each split: a class count that is not
        # data.num_classes means labels out of the heads' range, or train and val numbering classes differently.
        if "num_classes" in data and len(ds.classes) != data["num_classes"]:
            raise DatasetError(f"{ds.root} has {len(ds.classes)} class folders but data.num_classes is "
                               f"{data['num_classes']} (labels would be out of range or differ between splits)")
        return ds
    raise DatasetError(f"data.dataset: unknown dataset {data['dataset']!r}")
