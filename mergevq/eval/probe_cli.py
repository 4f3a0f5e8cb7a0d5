"""The ``mergevq linear-probe`` command: frozen features -> mergevq.eval.linear_probe (App. A.4).

Features of the whole train and val splits (evaluation transform, eval mode, no gradients) come
from one of three encoders:
* ``--tokenizer model.pt [--kept K]``: a trained tokenizer's EMA encoder at K merged tokens;
* ``--random-init VARIANT [--kept K]``: the same architecture as that variant's preset with
  random weights (torch.manual_seed(seed) then the trainer's build), the baseline a trained
  encoder has to beat;
* ``--raw-pixels``: the images themselves, for context.
For an encoder, ``eval.linear_probe.features`` picks the feature (FEATURE_KINDS):
  tokens_mean     the pre-quantisation merged tokens ``hidden`` (B, K, d) averaged over K: the
                  paper's "latent token space" (default);
  quantized_mean  the LFQ codes sign(z) (B, K, bits) averaged over K;
  global          the encoder's cls-token output (B, d).
Raw pixels are the [-1, 1] images, area-averaged to at most 32 x 32 (an ImageNet 256 px probe on
full-resolution pixels would hold 1.28M x 196,608 floats), then flattened.

``eval.linear_probe.train_augment`` (paper config: on, MAE's protocol): the training images go
through MAE's random-resized crop (scale 0.08-1, bicubic) and horizontal flip, a new view each
epoch, so the frozen encoder runs on the training split every epoch (90 encoder passes over
ImageNet instead of one) and train_top1 is measured on the centre crops. It needs an ImageFolder
dataset: the demo's digits keep it off, as a flipped or cropped digit is another shape (a mirrored
2 or 7 is no digit, a crop of an 8 can be a 0) and a probe trained on those would learn labels
the validation images never carry.

The JSON (written atomically): {"variant", "kept", "encoder": "trained"|"random_init"|"raw_pixels",
"features", "top1", "top1_ci" ([low, high], 95% percentile bootstrap over the val images),
"train_top1", "epochs", "steps", "batch_size", "lr", "train_augment", "num_train", "num_val",
"val_correct" (0/1 per val image in dataset order: `mergevq table` compares encoders pairwise on it)}.
"""
from __future__ import annotations

import argparse
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mergevq.tokenizer import MergeVQ
from mergevq.tokenizer.lfq import sign_quantize

FEATURE_KINDS = ("tokens_mean", "quantized_mean", "global")
RAW_PIXELS = "raw_pixels"
MAX_PIXEL_SIDE = 32


class Features(NamedTuple):
    features: torch.Tensor  # (N, D) float32 on the CPU
    labels: torch.Tensor  # (N,) int64


def pool_features(encoded, kind: str) -> torch.Tensor:
    """An EncoderOutput -> (B, D) features of `kind` (one of FEATURE_KINDS)."""
    if kind == "tokens_mean":
        return encoded.hidden.mean(dim=1)  # (B, d)
    if kind == "quantized_mean":
        return sign_quantize(encoded.z.float()).mean(dim=1)  # (B, bits), Eq. (4) codes averaged
    if kind == "global":
        return encoded.global_feature  # (B, d)
    raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS + (RAW_PIXELS,)}")


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) -> (B, 3 * h * w) with h = w = min(H, 32) by area averaging."""
    side = min(images.shape[-1], MAX_PIXEL_SIDE)
    if images.shape[-2:] != (side, side):
        images = F.adaptive_avg_pool2d(images, side)
    return images.flatten(1)


@torch.no_grad()
def batch_features(model: MergeVQ | None, images: torch.Tensor, kept: int | None, kind: str,
                   device: torch.device) -> torch.Tensor:
    """images (B, 3, R, R) in [-1, 1] -> features (B, D) float32 on the CPU (see extract_features)."""
    if kind == RAW_PIXELS:
        return pixel_features(images.float())
    images = images.to(device, non_blocking=True)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return pool_features(model.encode(images, kept), kind).float().cpu()


@torch.no_grad()
def extract_features(model: MergeVQ | None, dataset: Dataset, kept: int | None, kind: str, batch_size: int,
                     device: str | torch.device | None = None, *, num_workers: int = 0,
                     progress: bool = False) -> Features:
    """Features of every item of dataset (image (3, R, R) in [-1, 1], label int), in order.

    kind: one of FEATURE_KINDS (model's encoder at `kept` tokens, in eval mode, no gradients) or
    "raw_pixels" (model and kept unused). Returns Features(features (N, D) fp32 CPU, labels (N,)).
    """
    if kind not in FEATURE_KINDS + (RAW_PIXELS,):
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS + (RAW_PIXELS,)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if kind != RAW_PIXELS:
        if model is None or kept is None:
            raise ValueError(f"feature kind {kind!r} needs a model and a kept count")
        model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats, labels = [], []
    for images, y in tqdm(loader, desc=f"features ({kind})", unit="batch", disable=not progress):
        feats.append(batch_features(model, images, kept, kind, device))
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    if not feats:
        raise ValueError("extract_features: the dataset is empty")
    return Features(torch.cat(feats), torch.cat(labels))


def augmented_train_set(cfg: dict) -> Dataset:
    """The training split through MAE's linear-probe augmentation: RandomResizedCrop(R, scale
    (0.08, 1), bicubic) + RandomHorizontalFlip, as [-1, 1] tensors. ImageFolder only (see the
    module docstring for why not the digits)."""
    from torchvision import transforms as T

    from mergevq.config import ConfigError
    from mergevq.data import build_dataset
    from mergevq.eval.finetune import TimmImageFolder

    if cfg["data"]["dataset"] != "imagefolder":
        raise ConfigError(f"eval.linear_probe.train_augment: true needs data.dataset imagefolder, not "
                          f"{cfg['data']['dataset']!r} (a flipped or cropped digit is another shape)")
    res = cfg["data"]["resolution"]
    transform = T.Compose([T.RandomResizedCrop(res, interpolation=T.InterpolationMode.BICUBIC),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    return TimmImageFolder(build_dataset(cfg, "train", "train"), transform)


def augmented_feature_batches(model: MergeVQ | None, dataset: Dataset, kept: int | None, kind: str,
                              batch_size: int, device, seed: int, num_workers: int = 0):
    """(epoch -> iterator of (features (B, D), labels (B,))), steps per epoch) for
    train_linear_probe_stream: a shuffled pass over the augmented images per epoch, each batch
    through the frozen encoder; the last partial batch is dropped (BatchNorm, as MAE)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is not None:
        model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed),
                        persistent_workers=num_workers > 0)

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, y in loader:
            yield batch_features(model, images, kept, kind, device), torch.as_tensor(y, dtype=torch.int64)

    return epoch_batches, len(loader)


def random_init_tokenizer(cfg: dict, variant: str, seed: int) -> MergeVQ:
    """The variant's tokenizer as the trainer builds it, with random weights drawn after manual_seed(seed)."""
    from mergevq.config import variant_config
    from mergevq.tokenizer import build_tokenizer

    vc = variant_config(cfg, variant)
    torch.manual_seed(seed)
    return build_tokenizer(vc["preset"], bits=vc["codebook_bits"], kept=vc["kept"],
                           entropy_temperature=vc["loss"]["entropy_temperature"],
                           entropy_group_bits=vc["loss"]["entropy_group_bits"],
                           **vc.get("model_overrides", {})).eval()


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config YAML (data, eval.linear_probe settings)")
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="stage-1 model.pt: probe its frozen EMA encoder")
    source.add_argument("--random-init", metavar="VARIANT", help="probe a randomly initialised encoder of this variant")
    source.add_argument("--raw-pixels", action="store_true", help="probe the pixels (context baseline)")
    parser.add_argument("--kept", type=int, default=None,
                        help="merged tokens K (default: the variant's kept count; not with --raw-pixels)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from mergevq.config import ConfigError, load_config
    from mergevq.data import build_dataset
    from mergevq.eval.bootstrap import bootstrap_interval
    from mergevq.eval.linear_probe import train_linear_probe, train_linear_probe_stream
    from mergevq.files import write_json

    cfg = load_config(args.config, args.set)
    lp = cfg["eval"]["linear_probe"]
    seed = cfg["seed"]
    if args.raw_pixels:
        if args.kept is not None:
            raise ConfigError("--kept has no meaning with --raw-pixels")
        model, variant, kept, encoder, kind = None, None, None, RAW_PIXELS, RAW_PIXELS
    trained_for_kept = None
    if not args.raw_pixels:
        if args.tokenizer:
            from mergevq.tokenizer import load_tokenizer

            model, art = load_tokenizer(args.tokenizer, weights="ema")
            variant, default_kept, encoder = art["variant"], art["kept"], "trained"
            trained_for_kept = art.get("trained_for_kept")  # Table 4's per-K protocol
        else:
            model = random_init_tokenizer(cfg, args.random_init, seed)
            variant, encoder = args.random_init, "random_init"
            default_kept = cfg["tokenizer"]["variants"][variant]["kept"]
        if model.resolution != cfg["data"]["resolution"]:
            raise ConfigError(f"the {variant} tokenizer is built for {model.resolution} px but data.resolution is "
                              f"{cfg['data']['resolution']}")
        kept = int(args.kept if args.kept is not None else default_kept)
        if not 1 <= kept <= model.num_tokens:
            raise ConfigError(f"--kept {kept} is not in [1, {model.num_tokens}] for variant {variant}")
        kind = lp.get("features", "tokens_mean")

    workers = int(cfg["data"].get("num_workers", 0))
    batch = int(lp["batch_size"])
    augment = bool(lp["train_augment"])
    augmented = augmented_train_set(cfg) if augment else None  # checked before any feature is extracted
    train = extract_features(model, build_dataset(cfg, "train", "eval"), kept, kind, batch, args.device,
                             num_workers=workers, progress=True)
    val = extract_features(model, build_dataset(cfg, "val", "eval"), kept, kind, batch, args.device,
                           num_workers=workers, progress=True)
    common = dict(num_classes=int(cfg["data"]["num_classes"]), epochs=int(lp["epochs"]), lr=float(lp["lr"]),
                  weight_decay=float(lp["weight_decay"]), seed=seed, device=args.device)
    if augment:
        batches, steps = augmented_feature_batches(model, augmented, kept, kind, batch, args.device, seed, workers)
        result = train_linear_probe_stream(batches, steps, train.features.shape[1], val.features, val.labels,
                                           train_eval=(train.features, train.labels), **common)
    else:
        result = train_linear_probe(train.features, train.labels, val.features, val.labels, batch_size=batch,
                                    **common)
    del model
    metrics = {"variant": variant, "kept": kept, "encoder": encoder, "features": kind, "top1": result.top1,
               "trained_for_kept": trained_for_kept,
               "top1_ci": list(bootstrap_interval(result.val_correct.numpy(), seed=seed)),
               "train_top1": result.train_top1, "epochs": int(lp["epochs"]),
               "steps": result.steps, "batch_size": batch, "lr": float(lp["lr"]), "train_augment": augment,
               "num_train": len(train.labels), "num_val": len(val.labels),
               "val_correct": result.val_correct.int().tolist()}
    write_json(args.out, metrics)
    what = encoder if variant is None else f"{encoder} {variant} K={kept}"
    print(f"linear probe ({what}, {kind}): top-1 {result.top1:.4f} (train {result.train_top1:.4f})")
    return 0
