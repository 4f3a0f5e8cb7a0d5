"""End-to-end fine-tuning of a tokenizer's encoder for classification (App. A.4, SimMIM protocol).

The classifier is the tokenizer's whole encoder (CNN or patch embedding + ToMe blocks, merging
down to K tokens exactly as during tokenisation) followed by a head on the average-pooled merged
tokens: ``hidden`` (B, K, d) -> mean over K -> LayerNorm -> Linear. This is the ViT/BEiT/SimMIM
mean-pooling head (``fc_norm`` then ``head``); it has no BatchNorm, so a fine-tuning batch is never
normalised by its own statistics. The mean is unweighted over the K merged tokens (each merged
token counts once, whatever its size). The code projection to the LFQ channels is not used.

Every parameter of the encoder and the head is trained, from the tokenizer's EMA weights, with
AdamW and a per-step cosine schedule after a linear warm-up over the first fifth of the epochs
(SimMIM ViT-B: 20 of 100). ``epochs``, ``base_lr``, ``base_batch_size``, ``layer_decay``,
``batch_size``, ``weight_decay``, ``randaugment``, ``mixup`` and ``cutmix`` come from
``cfg['eval']['finetune']``.

Learning rate (SimMIM's ``main_finetune.py`` / ``optimizer.py``): the peak rate is linearly scaled
with the batch, ``lr = base_lr * batch_size / base_batch_size`` (SimMIM: base_lr 1.25e-3 per 512
images, so 2.5e-3 at the paper's batch 1024; MAE writes the same rule per 256), and each parameter
gets ``lr * layer_decay ** (num_layers + 1 - layer_id)`` (SimMIM / MAE ViT-B: 0.65), with
``num_layers`` the attention blocks and layer ids (``layer_id``):
* 0: everything before the first attention block: the cls token, the positional embedding, the
  patch embedding of R and, for the hybrid encoders of G and G+R, all CNN stages and the linear
  embedding into the transformer width. The CNN takes the place of ViT's patch embedding, so it
  gets its layer id (SimMIM gives Swin's patch embedding 0 too, and no layer id of its own to a
  stem); split into stages it would also claim ids the ViT blocks' decay was tuned for.
* i + 1: attention (ToMe) block i;
* num_layers + 1: the final norm, the unused code projection, and the head (fc_norm + linear).
Other settings follow SimMIM's ViT-B fine-tuning recipe and are constants below: label smoothing
0.1, gradient clipping at 5, stochastic depth 0.1 (linear over depth), no weight decay on biases,
norms, layer-scale gammas, the cls token and the positional embedding, AdamW betas (0.9, 0.999).

Augmentation (training split only):
* ``data.dataset: imagefolder``: timm's ``create_transform`` (random-resized crop, flip, RandAugment
  when ``randaugment`` names a policy, colour jitter 0.4 without it, random erasing 0.25), and timm's
  ``Mixup`` when ``mixup`` or ``cutmix`` is > 0 (soft targets with the label smoothing folded in,
  SoftTargetCrossEntropy);
* ``digits``: the images as they are (a flip or crop changes a digit; the demo config sets
  RandAugment off and mixup/cutmix 0, and those values are respected on either dataset).
Validation: the project's evaluation transform (resize + centre crop to data.resolution).

The reported top-1 is that of the last epoch on the val split (choosing the best epoch on the
validation set would inflate it); the per-epoch history is returned beside it.

`mergevq finetune --config C --tokenizer results/{run}/tokenizer/{V}/model.pt
 --out results/{run}/finetune/{V}/metrics.json [--kept K]`.
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mergevq.tokenizer import MergeVQ
from mergevq.tokenizer.encoder import MergeVQEncoder
from mergevq.train.schedule import lr_lambda

# SimMIM's ViT-B fine-tuning settings that the config does not carry.
LABEL_SMOOTHING = 0.1
GRAD_CLIP = 5.0
DROP_PATH = 0.1
BETAS = (0.9, 0.999)
WARMUP_FRACTION = 0.2  # 20 warm-up epochs of 100
HEAD_INIT_STD = 2e-5  # MAE's head initialisation: the classifier starts from near-zero logits
TIMM_TRAIN_AUG = dict(color_jitter=0.4, interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)


# ---------------------------------------------------------------------------------------------
# Model


class EncoderClassifier(nn.Module):
    """MergeVQ encoder at K kept tokens -> mean over K -> LayerNorm -> Linear."""

    def __init__(self, encoder: MergeVQEncoder, num_classes: int, kept: int):
        super().__init__()
        self.encoder = encoder
        self.kept = kept
        self.fc_norm = nn.LayerNorm(encoder.dim)
        self.head = nn.Linear(encoder.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> logits (B, num_classes)."""
        hidden = self.encoder(images, self.kept).hidden  # (B, K, d)
        return self.head(self.fc_norm(hidden.mean(dim=1)))


def set_drop_path(encoder: MergeVQEncoder, rate: float) -> None:
    """Stochastic depth increasing linearly from 0 (first block) to `rate` (last), as in timm ViTs."""
    from timm.layers import DropPath

    depth = len(encoder.blocks)
    for i, block in enumerate(encoder.blocks):
        p = rate * i / max(1, depth - 1)
        block.drop_path = DropPath(p) if p > 0 else nn.Identity()


def layer_id(name: str, num_layers: int) -> int:
    """Layer id of an EncoderClassifier parameter for layer-wise lr decay (module docstring):
    0 before the first attention block (cls token, positional embedding, CNN stages or patch
    embedding, linear embedding), i + 1 in block i, num_layers + 1 after (norm, projection, head)."""
    if name.startswith("encoder."):
        part = name.split(".")[1]
        if part in ("cls_token", "pos_embed", "stem", "embed"):
            return 0
        if part == "blocks":
            return int(name.split(".")[2]) + 1
    return num_layers + 1


def parameter_groups(model: "EncoderClassifier", weight_decay: float, lr: float,
                     layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups, one per (layer id, decay or not), each with its ``lr`` = lr * ``lr_scale``,
    ``lr_scale`` = layer_decay ** (num_layers + 1 - layer_id) (SimMIM's get_finetune_param_groups).
    Weight decay on weight matrices / conv kernels; none on biases, norm and layer-scale parameters
    (all 1-d), the cls token and the positional embedding (timm's no_weight_decay)."""
    num_layers = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")))
        lid = layer_id(name, num_layers)
        scale = layer_decay ** (num_layers + 1 - lid)
        group = groups.setdefault((lid, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                 "lr": lr * scale, "lr_scale": scale, "layer_id": lid})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def peak_lr(ft: dict) -> float:
    """The batch-scaled peak learning rate base_lr * batch_size / base_batch_size (SimMIM, MAE)."""
    return float(ft["base_lr"]) * int(ft["batch_size"]) / int(ft["base_batch_size"])


# ---------------------------------------------------------------------------------------------
# Data


class TimmImageFolder(Dataset):
    """An ImageFolderDataset's samples through a timm or torchvision transform (outputs in [-1, 1])."""

    def __init__(self, base, transform):
        self.samples = base.samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from mergevq.data.datasets import load_rgb

        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label


def finetune_datasets(cfg: dict) -> tuple[Dataset, Dataset]:
    """(train, val) datasets of the fine-tuning protocol for cfg['data'] (see the module docstring)."""
    from mergevq.data import build_dataset

    data, ft = cfg["data"], cfg["eval"]["finetune"]
    val = build_dataset(cfg, "val", transform="eval")
    if data["dataset"] != "imagefolder":
        return build_dataset(cfg, "train", transform="eval"), val
    from timm.data import create_transform

    base = build_dataset(cfg, "train", transform="train")
    transform = create_transform(
        input_size=data["resolution"], is_training=True, auto_augment=ft.get("randaugment") or None,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **TIMM_TRAIN_AUG)  # (x - 0.5) / 0.5: [-1, 1]
    return TimmImageFolder(base, transform), val


def build_mixup(ft: dict, num_classes: int):
    """timm Mixup (with the label smoothing) when mixup or cutmix alpha is > 0, else None."""
    mixup, cutmix = float(ft.get("mixup", 0.0)), float(ft.get("cutmix", 0.0))
    if mixup <= 0 and cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                 label_smoothing=LABEL_SMOOTHING, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


@torch.no_grad()
def evaluate_top1(classifier: nn.Module, loader: Iterable, device: torch.device) -> float:
    """Top-1 (fraction) of classifier over loader's (images, labels), in eval mode."""
    classifier.eval()
    correct = total = 0
    for images, labels in loader:
        with _autocast(device):
            logits = classifier(images.to(device, non_blocking=True))
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
        total += len(labels)
    if total == 0:
        raise ValueError("fine-tuning evaluation: the validation set is empty")
    return correct / total


def finetune_encoder(model: MergeVQ, cfg: dict, kept: int, seed: int, device: str | torch.device | None = None,
                     *, train_set: Dataset | None = None, val_set: Dataset | None = None,
                     progress: bool = True) -> dict:
    """Fine-tune model.encoder end to end with a classification head; returns the metrics.

    model: a MergeVQ (the caller loads the EMA weights); its encoder is trained in place (pass a
    copy to keep the tokenizer). kept: K, the merged-token count the encoder runs at. train_set /
    val_set replace the datasets of cfg['data'] (items (image (3, R, R) in [-1, 1], label int)).
    Deterministic given seed on CPU (it seeds torch, numpy and random, which timm's RandAugment and
    Mixup draw from). Returns {"kept", "top1", "epochs", "num_train", "num_val", "lr", "layer_decay",
    "history"} where lr is the batch-scaled peak rate (the head's) and history holds per epoch
    {"epoch", "lr" (the head's), "loss", "val_top1", "images_per_s"}.
    """
    ft = cfg["eval"]["finetune"]
    num_classes = int(cfg["data"]["num_classes"])
    epochs, batch_size = int(ft["epochs"]), int(ft["batch_size"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not 1 <= kept <= model.num_tokens:
        raise ValueError(f"fine-tuning: kept={kept} is not in [1, {model.num_tokens}] for tokenizer "
                         f"{model.config.name!r}")
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    if train_set is None or val_set is None:
        default_train, default_val = finetune_datasets(cfg)
        train_set = default_train if train_set is None else train_set
        val_set = default_val if val_set is None else val_set
    mixup = build_mixup(ft, num_classes)
    if mixup is not None and batch_size % 2:
        raise ValueError(f"eval.finetune.batch_size = {batch_size}: timm's batch Mixup/CutMix needs an even batch")
    if len(train_set) < batch_size:
        raise ValueError(f"fine-tuning: {len(train_set)} training images are fewer than one batch of {batch_size}")
    workers = int(cfg["data"].get("num_workers", 0))
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                              num_workers=workers, pin_memory=device.type == "cuda",
                              generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0)
    val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=workers,
                            pin_memory=device.type == "cuda")

    set_drop_path(model.encoder, DROP_PATH)
    classifier = EncoderClassifier(model.encoder, num_classes, kept).to(device)
    lr = peak_lr(ft)
    opt = torch.optim.AdamW(parameter_groups(classifier, float(ft["weight_decay"]), lr, float(ft["layer_decay"])),
                            lr=lr, betas=BETAS)
    steps_per_epoch = len(train_loader)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda("cosine", total, round(WARMUP_FRACTION * epochs) * steps_per_epoch))
    if mixup is not None:
        from timm.loss import SoftTargetCrossEntropy

        criterion = SoftTargetCrossEntropy()
    else:
        def criterion(logits, labels):
            return F.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING)

    history = []
    for epoch in range(epochs):
        classifier.train()
        loss_sum, seen, elapsed = 0.0, 0, 0.0
        bar = tqdm(train_loader, desc=f"finetune {epoch + 1}/{epochs}", unit="batch", disable=not progress,
                   leave=False)
        for images, labels in bar:
            start = time.perf_counter()
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            lr = max(g["lr"] for g in opt.param_groups)  # the head's (lr_scale 1)
            if mixup is not None:
                images, labels = mixup(images, labels)
            with _autocast(device):
                logits = classifier(images)
            loss = criterion(logits.float(), labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss is {loss.item()} at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(classifier.parameters(), GRAD_CLIP)
            opt.step()
            sched.step()
            n = len(images)
            loss_sum += loss.item() * n
            seen += n
            elapsed += time.perf_counter() - start
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen / max(elapsed, 1e-9):.0f}", lr=f"{lr:.2e}")
        bar.close()
        val_top1 = evaluate_top1(classifier, val_loader, device)
        history.append({"epoch": epoch, "lr": lr, "loss": loss_sum / seen, "val_top1": val_top1,
                        "images_per_s": seen / max(elapsed, 1e-9)})
        if progress:
            tqdm.write(f"finetune epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f}, "
                       f"val top-1 {val_top1:.4f}, {seen / max(elapsed, 1e-9):.0f} images/s")
    return {"kept": int(kept), "top1": history[-1]["val_top1"], "epochs": epochs,
            "num_train": len(train_set), "num_val": len(val_set), "lr": peak_lr(ft),
            "layer_decay": float(ft["layer_decay"]), "history": history}


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config YAML (eval.finetune settings, data)")
    parser.add_argument("--tokenizer", required=True, help="stage-1 model.pt (its EMA weights are fine-tuned)")
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    parser.add_argument("--kept", type=int, default=None,
                        help="merged tokens K the encoder runs at (default: the variant's kept count)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from mergevq.config import ConfigError, load_config
    from mergevq.files import write_json
    from mergevq.tokenizer import load_tokenizer

    cfg = load_config(args.config, args.set)
    model, art = load_tokenizer(args.tokenizer, weights="ema")
    if model.resolution != cfg["data"]["resolution"]:
        raise ConfigError(f"{args.tokenizer}: tokenizer built for {model.resolution} px but data.resolution "
                         f"is {cfg['data']['resolution']}")
    kept = int(args.kept if args.kept is not None else art["kept"])
    if not 1 <= kept <= model.num_tokens:
        raise ConfigError(f"--kept {kept} is not in [1, {model.num_tokens}] for tokenizer {args.tokenizer}")
    result = finetune_encoder(model, cfg, kept, cfg["seed"], args.device)
    metrics = {"variant": art["variant"], "kept": kept, "top1": result["top1"], "epochs": result["epochs"],
               "num_train": result["num_train"], "num_val": result["num_val"], "lr": result["lr"],
               "layer_decay": result["layer_decay"]}
    write_json(args.out, metrics)
    print(f"finetune {art['variant']} K={kept}: top-1 {result['top1']:.4f} "
          f"({result['num_train']} train / {result['num_val']} val images, {result['epochs']} epochs)")
    return 0
