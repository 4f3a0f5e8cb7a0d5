"""A small CNN digit classifier: the demo's feature extractor for FID and IS.

FID and IS need a classifier's features. Inception-v3 needs downloaded weights and the demo runs
offline, so the 32x32 digits are scored with this network instead: trained on the digits train
split, saved with the sha256 of its weights file, and registered in torch-fidelity as the feature
extractor ``"demo-classifier"``. Its FIDs are comparable only with FIDs from the same weights file
(the protocol of every number records that hash), never with Inception FIDs.

The layout is Inception's in miniature: conv stages (32 -> 16 -> 8 px), the last with
``feature_dim`` channels, global average pooling of the post-ReLU map (Inception's pool3, the FID
feature, named ``str(feature_dim)`` as torch-fidelity names Inception's "2048"), then a bias-free
linear classifier whose logits are torch-fidelity's ``"logits_unbiased"`` (the IS feature; with no
bias they are the classifier's logits themselves).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm import tqdm

from mergevq.eval.fidelity import sha256_file

EXTRACTOR_NAME = "demo-classifier"
CHECKPOINT_FORMAT = "mergevq-demo-classifier/1"


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoClassifierConfig:
    feature_dim: int = 64  # penultimate (FID) feature size
    num_classes: int = 10
    width: int = 16  # first-stage channels; x2 in the second, x4 in the third (1,437 digits need no more)
    resolution: int = 32  # inputs of another size are resized to this


class DemoClassifierOutput(NamedTuple):
    features: torch.Tensor  # (B, feature_dim) pooled post-ReLU activations
    logits: torch.Tensor  # (B, num_classes)


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class DemoClassifier(nn.Module):
    def __init__(self, config: DemoClassifierConfig = DemoClassifierConfig()):
        super().__init__()
        self.config = config
        w, d = config.width, config.feature_dim
        self.trunk = nn.Sequential(
            *_conv_bn_relu(3, w), *_conv_bn_relu(w, w), nn.MaxPool2d(2),  # (B, w, R/2, R/2)
            *_conv_bn_relu(w, 2 * w), *_conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2),  # (B, 2w, R/4, R/4)
            *_conv_bn_relu(2 * w, 4 * w), *_conv_bn_relu(4 * w, d),  # (B, d, R/4, R/4)
        )
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(d, config.num_classes, bias=False)

    def forward(self, images: torch.Tensor) -> DemoClassifierOutput:
        """images (B, 3, R, R) float in [-1, 1] -> features (B, D), logits (B, C)."""
        features = self.trunk(images).mean(dim=(2, 3))  # global average pool, (B, D)
        return DemoClassifierOutput(features, self.classifier(self.dropout(features)))


def uint8_to_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, R, R) in [-1, 1]; resized (bilinear, antialiased) if H, W != R."""
    x = images.float()
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x.div(127.5).sub(1.0)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of x (B, C, H, W) by its own integer offset in [-max_shift, max_shift]^2.

    Borders are replicated rather than zero-filled, so the shift works for any background colour.
    """
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (B, C, H+2s, W+2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, y : y + h, x0 : x0 + w] for i, (y, x0) in enumerate(zip(dy, dx))])


def train_demo_classifier(
    train_images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    feature_dim: int = 64,
    seed: int = 0,
    num_classes: int = 10,
    width: int = 16,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    max_shift: int = 2,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> DemoClassifier:
    """Train a DemoClassifier on train_images uint8 (N, 3, R, R) with labels int (N,).

    AdamW with a per-step cosine schedule, cross-entropy, random shifts of up to ``max_shift``
    pixels (no flips: a flipped digit is another digit). Deterministic on CPU given ``seed``; the
    global RNG state is left as it was. Returns the model in eval mode on the CPU.
    """
    if train_images.dtype != torch.uint8 or train_images.dim() != 4 or train_images.shape[1] != 3:
        raise ValueError(
            f"train_images must be uint8 (N, 3, H, W), got {train_images.dtype} {tuple(train_images.shape)}"
        )
    if labels.shape != (len(train_images),):
        raise ValueError(f"labels must have shape ({len(train_images)},), got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = DemoClassifierConfig(
        feature_dim=feature_dim, num_classes=num_classes, width=width, resolution=train_images.shape[-1]
    )
    # Dropout draws from the global RNG: seed it for the whole run, then restore the caller's state.
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        model = DemoClassifier(config).to(device)
        _fit(model, uint8_to_input(train_images, config.resolution), labels.long(), epochs=epochs,
             batch_size=batch_size, lr=lr, weight_decay=weight_decay, max_shift=max_shift,
             generator=torch.Generator().manual_seed(seed), progress=progress)
    return model.cpu().eval()


def _fit(model, x_all, y_all, *, epochs, batch_size, lr, weight_decay, max_shift, generator, progress) -> None:
    """The training loop: x_all (N, 3, R, R) in [-1, 1] on the CPU, y_all (N,)."""
    device = next(model.parameters()).device
    n = len(x_all)
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    bar = tqdm(total=total, desc="demo-classifier", unit="step", disable=not progress)
    start, seen = time.perf_counter(), 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = random_shift(x_all[idx], max_shift, generator).to(device)
            loss = F.cross_entropy(model(x).logits, y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    bar.close()


@torch.no_grad()
def classifier_accuracy(
    model: DemoClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """Top-1 accuracy of model on images uint8 (N, 3, H, W), labels (N,)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        x = uint8_to_input(images[i : i + batch_size], model.config.resolution).to(device)
        correct += (model(x).logits.argmax(-1).cpu() == labels[i : i + batch_size]).sum().item()
    return correct / len(images)


# ---------------------------------------------------------------------------------------------
# Weights file
# ---------------------------------------------------------------------------------------------
def save_demo_classifier(model: DemoClassifier, path: str | Path) -> str:
    """Write {format, config, state_dict} atomically to path; return the file's sha256."""
    from mergevq.files import torch_save

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save({"format": CHECKPOINT_FORMAT, "config": asdict(model.config), "state_dict": state}, path)
    return sha256_file(path)


def _read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"demo-classifier weights not found: {path} (they are trained, not downloaded: "
            "`mergevq train-demo-classifier --config config/demo.yaml --out FILE`)"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a demo-classifier weights file (expected format {CHECKPOINT_FORMAT!r})")
    return ckpt


def read_demo_config(path: str | Path) -> DemoClassifierConfig:
    """The DemoClassifierConfig stored in a weights file."""
    return DemoClassifierConfig(**_read_checkpoint(path)["config"])


def load_demo_classifier(path: str | Path, sha256: str | None = None) -> DemoClassifier:
    """Rebuild the classifier saved at path (CPU, eval mode); if sha256 is given, the file must match it."""
    if sha256 is not None and Path(path).is_file() and sha256_file(path) != sha256:
        raise ValueError(f"{path}: sha256 {sha256_file(path)} differs from the expected {sha256}")
    ckpt = _read_checkpoint(path)
    model = DemoClassifier(DemoClassifierConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


# ---------------------------------------------------------------------------------------------
# torch-fidelity feature extractor
# ---------------------------------------------------------------------------------------------
class DemoClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor "demo-classifier": uint8 (B, 3, H, W) -> features by name.

    Features: ``str(feature_dim)`` (pooled penultimate activations; FID/KID/PRC) and
    ``"logits_unbiased"`` (IS). The weights file comes from ``feature_extractor_weights_path``
    (there is nothing to download). Modifications relative to torch-fidelity's Inception extractor:
    ``get_provided_features_list`` is an instance method, because the feature name depends on the
    weights file; the base class only calls it through the instance. The static
    ``get_default_feature_layer_for_metric`` returns the default "64": for another feature_dim pass
    ``feature_layer_fid=str(feature_dim)`` (``mergevq.eval.fidelity`` does so from the file).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor {EXTRACTOR_NAME!r} needs feature_extractor_weights_path")
        net = load_demo_classifier(feature_extractor_weights_path)
        # Set before the base __init__, which checks features_list against get_provided_features_list().
        self._feature_name = str(net.config.feature_dim)
        super().__init__(name, features_list)
        self.net = net
        self.requires_grad_(False)
        self.eval()

    def get_provided_features_list(self):
        return (self._feature_name, "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        default = str(DemoClassifierConfig.feature_dim)
        return {"isc": "logits_unbiased", "fid": default, "kid": default, "prc": default}[metric]

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 32, 32]) * 255).to(torch.uint8)

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8):
            got = f"{type(x).__name__} {getattr(x, 'dtype', '')}"
            raise ValueError(f"expecting images as a uint8 torch.Tensor, got {got}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"input is not (B, 3, H, W): {tuple(x.shape)}")
        out = self.net(uint8_to_input(x, self.net.config.resolution))
        features = {self._feature_name: out.features, "logits_unbiased": out.logits}
        return tuple(features[name].float() for name in self.features_list)


if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:  # registering twice is an error in torch-fidelity
    register_feature_extractor(EXTRACTOR_NAME, DemoClassifierFeatureExtractor)


# ---------------------------------------------------------------------------------------------
# Command line: mergevq train-demo-classifier
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config YAML (data: digits; eval.demo_classifier settings)")
    parser.add_argument("--out", required=True, help="weights file to write")
    parser.add_argument("--json", help="also write the summary (accuracy, sha256) to this JSON file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def run(args) -> int:
    from mergevq.config import ConfigError, load_config
    from mergevq.data import digits_arrays
    from mergevq.files import write_json

    cfg = load_config(args.config, args.set)
    data = cfg["data"]
    if data["dataset"] != "digits":
        raise ConfigError(
            f"{args.config}: data.dataset: the demo classifier is trained on 'digits', not {data['dataset']!r}"
        )
    settings = cfg["eval"].get("demo_classifier")
    if settings is None:
        raise ConfigError(f"{args.config}: eval.demo_classifier: missing (epochs, feature_dim)")
    split = dict(resolution=data["resolution"], val_fraction=data["val_fraction"], seed=cfg["seed"])
    train_x, train_y = digits_arrays(split="train", **split)
    val_x, val_y = digits_arrays(split="val", **split)
    model = train_demo_classifier(
        train_x, train_y, epochs=settings["epochs"], feature_dim=settings["feature_dim"], seed=cfg["seed"]
    )
    sha = save_demo_classifier(model, args.out)
    summary = {
        "weights": str(args.out),
        "sha256": sha,
        "config": asdict(model.config),
        "train_top1": classifier_accuracy(model, train_x, train_y),
        "val_top1": classifier_accuracy(model, val_x, val_y),
        "num_train": len(train_x),
        "num_val": len(val_x),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        write_json(args.json, summary)
    return 0
