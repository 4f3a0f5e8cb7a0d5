"""Linear probing of frozen features (App. A.4, following MAE).

The probe is BatchNorm1d without affine parameters followed by one linear layer, as MAE's
``main_linprobe.py`` builds it (BN eps 1e-6; head weight ~ trunc_normal(std 0.01), bias 0): the
parameter-free BN standardises the features so that one learning rate suits every encoder. App. A.4
trains it with AdamW (MAE uses LARS), batch 1024, 90 epochs, lr 1e-3 with cosine annealing; MAE's
warm-up is available (``warmup_epochs``) but off, as the paper does not mention it. The schedule is
set per step (MAE adjusts the rate every iteration).

Training augmentation (``eval.linear_probe.train_augment``): MAE's probe sees each training image
through a random-resized crop (scale 0.08-1, bicubic) and a horizontal flip, so the frozen encoder
runs on a new view every epoch (`train_linear_probe_stream`); without it the features are
extracted once and the probe trains on them (`train_linear_probe`). Validation is always the
centre crop.

The reported top-1 is that of the final epoch, not the best over epochs: choosing the epoch on the
validation set would inflate it. The per-epoch history is returned beside it, and so is which
validation images the final probe gets right, so that two encoders probed on the same split can
be compared pairwise (`mergevq.eval.bootstrap.paired_bootstrap`): on a few hundred images one top-1 alone is +-2-3 points.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


class ProbeResult(NamedTuple):
    top1: float  # validation top-1 (fraction in [0, 1]) after the last epoch
    train_top1: float  # training-set top-1 of the final probe, in eval mode
    history: list[dict]  # per epoch: {"epoch", "lr", "loss" (mean train CE), "val_top1"}
    val_correct: torch.Tensor  # (M,) bool: the final probe's prediction on val image i is right
    steps: int  # optimiser steps taken (epochs x batches per epoch)


def build_probe(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(dim, affine=False, eps=1e-6) -> Linear(dim, num_classes), MAE's initialisation."""
    head = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head)


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Linear warm-up to base_lr, then half-cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def probe_correct(probe: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """(N,) bool on the CPU: probe's top-1 prediction on features x (N, D) equals y (N,), in eval mode."""
    probe.eval()
    device = next(probe.parameters()).device
    return torch.cat([probe(x[i : i + batch_size].to(device).float()).argmax(-1).cpu() == y[i : i + batch_size]
                      for i in range(0, len(x), batch_size)])


def probe_accuracy(probe: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
    """Top-1 of probe on features x (N, D), labels y (N,), in eval mode."""
    return probe_correct(probe, x, y, batch_size).float().mean().item()


def _check(x: torch.Tensor, y: torch.Tensor, num_classes: int, name: str) -> None:
    if x.dim() != 2 or y.shape != (len(x),):
        raise ValueError(f"{name}: expected features (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) == 0:
        raise ValueError(f"{name}: no samples")
    if y.is_floating_point() or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"{name}: labels must be integers in [0, {num_classes}), got {y.dtype} in [{y.min()}, {y.max()}]"
        )


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 90,
    lr: float = 1e-3,
    batch_size: int = 1024,
    weight_decay: float = 0.0,
    seed: int = 0,
    warmup_epochs: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ProbeResult:
    """Train BN(affine=False) + Linear on frozen features; deterministic on CPU given seed.

    train_x (N, D), train_y (N,) int; val_x (M, D), val_y (M,). AdamW, per-step cosine schedule,
    shuffled mini-batches (the last partial batch is kept unless it has one sample, which
    BatchNorm cannot normalise). The global RNG state is left as it was.
    """
    _check(train_x, train_y, num_classes, "train")
    generator = torch.Generator().manual_seed(seed)
    n = len(train_x)
    batches = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(batches) > 1 and batches[-1][1] - batches[-1][0] == 1:
        batches.pop()  # a single-sample batch has no batch statistics

    def epoch_batches(epoch: int):
        order = torch.randperm(n, generator=generator)
        for start, end in batches:
            idx = order[start:end]
            yield train_x[idx], train_y[idx]

    return train_linear_probe_stream(
        epoch_batches, len(batches), train_x.shape[1], val_x, val_y, num_classes=num_classes, epochs=epochs, lr=lr,
        weight_decay=weight_decay, seed=seed, warmup_epochs=warmup_epochs, device=device, progress=progress,
        train_eval=(train_x, train_y))


def train_linear_probe_stream(
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    steps_per_epoch: int,
    dim: int,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 90,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    warmup_epochs: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    train_eval: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ProbeResult:
    """The probe trained on batches that are made anew each epoch (e.g. augmented views through a
    frozen encoder). epoch_batches(epoch) yields steps_per_epoch batches (features (B, dim),
    labels (B,)), B > 1; the cosine schedule runs over epochs x steps_per_epoch steps. train_eval:
    features and labels on which train_top1 is measured (NaN without)."""
    _check(val_x, val_y, num_classes, "val")
    if val_x.shape[1] != dim:
        raise ValueError(f"train features are {dim}-d but val features are {val_x.shape[1]}-d")
    if steps_per_epoch < 1:
        raise ValueError(f"linear probe: {steps_per_epoch} steps per epoch (fewer training images than one batch?)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = build_probe(dim, num_classes).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    history: list[dict] = []
    step = 0
    bar = tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not progress)
    for epoch in bar:
        probe.train()
        loss_sum, seen = 0.0, 0
        for x, y in epoch_batches(epoch):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, lr, warmup)
            x, y = x.to(device).float(), y.to(device)
            loss = F.cross_entropy(probe(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            step += 1
        val_correct = probe_correct(probe, val_x, val_y)
        val_top1 = val_correct.float().mean().item()
        history.append({"epoch": epoch, "lr": opt.param_groups[0]["lr"], "loss": loss_sum / max(seen, 1),
                        "val_top1": val_top1})
        bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", val_top1=f"{val_top1:.4f}")
    bar.close()
    if not history:  # epochs=0: the untrained probe
        val_correct = probe_correct(probe, val_x, val_y)
    return ProbeResult(
        top1=val_correct.float().mean().item(),  # = history[-1]["val_top1"]: the same final probe
        train_top1=probe_accuracy(probe, *train_eval) if train_eval is not None else math.nan,
        history=history,
        val_correct=val_correct,
        steps=step,
    )
