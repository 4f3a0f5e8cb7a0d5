"""The offline alignment teacher: a small CNN trained with SimCLR on the training images, no labels.

Eq. (12) aligns MergeVQ's global feature with the output of a frozen self-supervised network,
DINOv2-Base in the paper. With nothing to download, `tokenizer.loss.teacher: ssl` plays the same
part with a network trained here first, in its own DAG rule: SimCLR (Chen et al. 2020) on the
training split, labels never read. Like DINOv2 it is trained apart from the tokenizer and frozen
while the tokenizer learns, so Eq. (12) distils what it learned about which images look alike.
(The other offline option, `teacher: ema`, learns its own teacher during the tokenizer's few
hundred steps; on the digits that teacher stayed close to its random start.)

Network: the demo classifier's CNN trunk (mergevq.eval.demo_classifier; conv stages, global
average pool to `feature_dim`) and SimCLR's projector (Linear-ReLU-Linear). The teacher output that
Eq. (12) aligns to is the pooled trunk feature, as DINOv2's is its pooled feature rather than its
training head. Views: random resized crop (flipped unless the data are digits) and a random
rotation / shift, drawn from the global RNG (exact resume through the shared loop).

`mergevq train-ssl-teacher --config C --out DIR [--max-steps N]` -> DIR/model.pt (+ the loop's
last.ckpt, metrics.csv, val.csv with a k-NN top-1 monitor, run.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mergevq.data.augment import random_affine, random_resized_crop
from mergevq.eval.demo_classifier import DemoClassifier, DemoClassifierConfig
from mergevq.train.schedule import lr_lambda

ARTIFACT_FORMAT = "mergevq-ssl-teacher/1"


@dataclass(frozen=True)
class SSLTeacherConfig:
    feature_dim: int = 64  # pooled trunk feature: the teacher output of Eq. (12)
    width: int = 16  # first-stage channels of the trunk
    proj_dim: int = 64  # SimCLR projector output (the contrastive space)
    resolution: int = 32


def nt_xent_loss(z_u: torch.Tensor, z_v: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss: for each of the 2B embeddings its other view is the positive among the
    2B - 1 others. z_u, z_v (B, P), row i of each from the same image -> scalar (mean over 2B)."""
    if z_u.shape != z_v.shape or z_u.dim() != 2:
        raise ValueError(f"nt_xent_loss: expected two (B, P) tensors of one shape, got {tuple(z_u.shape)} "
                         f"and {tuple(z_v.shape)}")
    B = z_u.shape[0]
    z = F.normalize(torch.cat([z_u, z_v]).float(), dim=-1)  # (2B, P)
    sim = z @ z.t() / temperature  # cosine similarities
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(z.device)
    return F.cross_entropy(sim, positive)


class SSLTeacherNet(nn.Module):
    """CNN trunk + SimCLR projector. features(images) -> (B, feature_dim); forward -> (B, proj_dim)."""

    def __init__(self, config: SSLTeacherConfig = SSLTeacherConfig()):
        super().__init__()
        self.config = config
        self.trunk = DemoClassifier(DemoClassifierConfig(feature_dim=config.feature_dim, width=config.width,
                                                         resolution=config.resolution)).trunk
        self.projector = nn.Sequential(nn.Linear(config.feature_dim, 2 * config.feature_dim), nn.ReLU(inplace=True),
                                       nn.Linear(2 * config.feature_dim, config.proj_dim))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, R, R) in [-1, 1] -> pooled trunk features (B, feature_dim)."""
        return self.trunk(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(images))


def two_views(images: torch.Tensor, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent augmentations of each image (B, 3, H, W)."""
    return (random_affine(random_resized_crop(images, flip=flip)),
            random_affine(random_resized_crop(images, flip=flip)))


@torch.no_grad()
def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
             val_labels: torch.Tensor, k: int = 20) -> float:
    """Majority vote of the k most cosine-similar training features (a label-using monitor only)."""
    sim = F.normalize(val_feats, dim=-1) @ F.normalize(train_feats, dim=-1).t()  # (M, N)
    nearest = sim.topk(min(k, len(train_feats)), dim=-1).indices
    votes = F.one_hot(train_labels[nearest], int(max(train_labels.max(), val_labels.max())) + 1).sum(1)
    return (votes.argmax(-1) == val_labels).float().mean().item()


class SSLTeacherStage:
    """SimCLR training of SSLTeacherNet as a stage of mergevq.train.loop.fit."""

    name = "ssl_teacher"

    def __init__(self, cfg: dict, device: torch.device):
        self.cfg, self.device = cfg, device
        self.settings = cfg["tokenizer"]["ssl_teacher"]
        self.config = SSLTeacherConfig(feature_dim=int(self.settings["feature_dim"]),
                                       resolution=int(cfg["data"]["resolution"]))
        self.net = SSLTeacherNet(self.config).to(device)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=float(self.settings["lr"]),
                                     weight_decay=float(self.settings["weight_decay"]))
        steps = int(self.settings["steps"])
        # SimCLR's schedule in short: linear warm-up over the first tenth, cosine decay to 0
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda("cosine", steps, max(1, steps // 10)))
        self.flip = cfg["data"]["dataset"] != "digits"
        self.val_data = None

    def train_step(self, batch, step: int) -> dict[str, float]:
        images = batch[0].to(self.device, non_blocking=True)
        self.net.train()
        u, v = two_views(images, self.flip)
        loss = nt_xent_loss(self.net(u), self.net(v), float(self.settings["temperature"]))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return {"loss": float(loss.detach()), "lr": self.sched.get_last_lr()[0]}

    @torch.no_grad()
    def validate(self, step: int, out_dir: Path) -> dict[str, float]:
        from mergevq.data import build_dataset

        if self.val_data is None:
            self.val_data = [_stack(build_dataset(self.cfg, split, "eval"), int(self.settings["monitor_images"]))
                             for split in ("train", "val")]
        self.net.eval()
        (tx, ty), (vx, vy) = self.val_data
        feats = [torch.cat([self.net.features(x[i:i + 256].to(self.device)).cpu() for i in range(0, len(x), 256)])
                 for x in (tx, vx)]
        return {"knn_top1": knn_top1(feats[0], ty, feats[1], vy)}

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])

    def artifact(self) -> dict:
        return teacher_artifact(self.net)


def teacher_artifact(net: SSLTeacherNet) -> dict:
    """What SSLTeacher loads: the trunk's weights and config (the projector is SimCLR's, not needed)."""
    return {"format": ARTIFACT_FORMAT, "teacher_config": dataclasses.asdict(net.config),
            "trunk": net.trunk.state_dict()}


def _stack(dataset, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(len(dataset), limit)
    items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.as_tensor([y for _, y in items], dtype=torch.int64)


class SSLTeacher(nn.Module):
    """The frozen teacher of Eq. (12) with `teacher: ssl`: forward(images (B, 3, H, W) in [-1, 1]) ->
    (B, embed_dim) pooled trunk features (resized to the trained resolution when they differ)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        from mergevq.train.checkpoint import load_checkpoint

        try:
            art = load_checkpoint(path, weights_only=False)  # CheckpointError names a corrupt file
        except FileNotFoundError:
            raise FileNotFoundError(f"SSL alignment teacher not found: {path} (make it with `mergevq "
                                    f"train-ssl-teacher --config C --out DIR`; the DAG's train_ssl_teacher rule "
                                    f"does, and passes DIR/model.pt to train-tokenizer --teacher)") from None
        if art.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"{path} is not an SSL teacher artefact (format {ARTIFACT_FORMAT!r})")
        self.config = SSLTeacherConfig(**art["teacher_config"])
        net = SSLTeacherNet(self.config)
        net.trunk.load_state_dict(art["trunk"])
        self.trunk = net.trunk
        self.embed_dim = self.config.feature_dim
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "SSLTeacher":
        return super().train(False)  # BatchNorm statistics stay frozen

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        r = self.config.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return self.trunk(x).mean(dim=(2, 3))


# -- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config YAML (data, tokenizer.ssl_teacher)")
    parser.add_argument("--out", required=True, help="output directory (model.pt, last.ckpt, metrics.csv, ...)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from mergevq.config import ConfigError, config_hash, load_config
    from mergevq.data import build_dataset
    from mergevq.train.distributed import DistEnv
    from mergevq.train.loop import LoopConfig, fit

    cfg = load_config(args.config, args.set)
    settings = cfg["tokenizer"].get("ssl_teacher")
    if settings is None:
        raise ConfigError(f"{args.config}: tokenizer.ssl_teacher: missing (steps, batch_size, lr, ...)")
    dist = DistEnv.from_env()
    if dist.distributed:  # a small CNN on one device; ranks would each train their own copy
        raise ConfigError("train-ssl-teacher runs in one process: launch it with python, not torchrun")
    torch.manual_seed(cfg["seed"])
    stage = SSLTeacherStage(cfg, dist.device)
    steps = int(settings["steps"])
    loop = LoopConfig(total_steps=steps, batch_size=int(settings["batch_size"]), seed=cfg["seed"],
                      log_every=10, val_every=steps, ckpt_every=max(1, steps // 4), max_steps=args.max_steps,
                      num_workers=cfg["data"].get("num_workers", 0))
    hashed = {"data": cfg["data"], "seed": cfg["seed"], "ssl_teacher": settings}
    try:
        return fit(stage, build_dataset(cfg, "train", transform="eval"), loop, args.out, cfg, config_hash(hashed), dist)
    finally:
        dist.cleanup()
