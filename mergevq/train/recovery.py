"""Fine-tuning Source Recovery on a frozen tokenizer (App. A.2, Table A2) with the shared loop.

The paper fine-tunes the recovery after stage 1 for RandAR generation ("5 (optional)" epochs,
AdamW (0.9, 0.95), lr 1e-4, weight decay 0.01, batch 256, step schedule). Per step (batch x, K
drawn by the variant's stage-1 merge-ratio sampler, Eq. 19/20, so S_hat is trained where stage 1
trained it):
  frozen encoder + LFQ (EMA weights, no gradient): Z_Kq and the true S
  recovery loss (Eq. 11, `source_type`) on the recovery's logits, one AdamW step;
  with `finetune_decoder`: also the reconstruction loss of a copy of the decoder fed S_hat
  (canonical_source of the same logits, no gradient through it), in the same step.
The tokenizer's own files never change: reconstruction with S (Tables 2 and 4) keeps the stage-1
decoder, and the S_hat decoder lives in the recovery artefact.

`augment` (demo): a random rotation / shift (data.augment.random_affine) of a fraction of each
batch. The digits have 1,437 training images and no training transform; re-encoding moved copies
gives the recovery new (codes, S) pairs instead of the same ones every epoch.

Fine-tuned for generation (App. A.2: "fine-tuned with the generator obtained after stage-2
training"; `--generator RANDAR.pt --init RECOVERY.pt`, settings `generator.recovery_randar`, which
override `recovery_finetune`'s): starting from the fine-tuned recovery, every step encodes at the
generator's K (its N merged tokens) and, for a share `mix` of the batch, replaces the encoder's
codes by the generator's teacher-forced predictions on them (a random slot order per sample, the
image's class, no CFG; `predictions`: "sample" draws each sub-token from its softmax at
temperature 1, "argmax" takes the most likely; the second sub-token is conditioned on the true
first, as teacher forcing does). The target S stays the encoder's, so the recovery learns to place
codes as the generator emits them (near misses included) where the true S is known.

`mergevq finetune-recovery --config C --tokenizer M --out DIR [--generator G --init R] [--max-steps N]`
-> DIR/model.pt (tokenizer.recovery.load_recovery reads it; the loop's last.ckpt, metrics.csv,
val.csv, run.json beside it).
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn as nn

from mergevq.config import ConfigError, config_hash, load_config, variant_config
from mergevq.data.augment import random_affine
from mergevq.data.merge_sampling import MergeRatioSampler
from mergevq.tokenizer import load_tokenizer
from mergevq.tokenizer.lfq import indices_to_codes
from mergevq.tokenizer.recovery import canonical_source, recovery_artifact, source_recovery_loss, token_recovery
from mergevq.train.distributed import DistEnv
from mergevq.train.schedule import lr_lambda

SOURCE_TYPES = ("bce", "ce")
PREDICTIONS = ("sample", "argmax")


def generation_settings(cfg: dict) -> dict:
    """`recovery_finetune` overridden by `recovery_randar` (fine-tuning for RandAR generation)."""
    block = cfg["generator"].get("recovery_randar")
    if block is None:
        raise ConfigError("generator.recovery_randar: missing (mix, predictions and the settings that differ "
                          "from recovery_finetune for the fine-tuning with the RandAR generator)")
    if block["predictions"] not in PREDICTIONS:
        raise ConfigError(f"generator.recovery_randar.predictions: {block['predictions']!r} is not one of {PREDICTIONS}")
    if not 0.0 <= float(block["mix"]) <= 1.0:
        raise ConfigError(f"generator.recovery_randar.mix: {block['mix']} is not in [0, 1]")
    return {**cfg["generator"]["recovery_finetune"], **block}


@torch.no_grad()
def teacher_forced_predictions(generator: nn.Module, indices: torch.Tensor, labels: torch.Tensor,
                               how: str, rng: torch.Generator | None = None) -> torch.Tensor:
    """The generator's teacher-forced codes for merged codes `indices` (B, K) of classes `labels`:
    per sub-token argmax or a draw from its softmax (random slot order per sample, global RNG)."""
    from mergevq.generator.gpt import merge_codes

    generator.eval()
    logits = generator.teacher_forced_logits(indices, labels)
    if how == "argmax":
        parts = [lg.argmax(-1) for lg in logits]
    else:
        parts = [torch.multinomial(lg.float().softmax(-1).flatten(0, 1), 1, generator=rng).view(lg.shape[:-1])
                 for lg in logits]
    return merge_codes(parts, generator.config.bits_split)


class RecoveryTrainee(nn.Module):
    """What the fine-tuning trains, as one module so DDP can wrap it: the recovery and, with
    `finetune_decoder`, the decoder that S_hat feeds."""

    def __init__(self, recovery: nn.Module, decoder: nn.Module | None):
        super().__init__()
        self.recovery, self.decoder = recovery, decoder

    def forward(self, quantized: torch.Tensor, source: torch.Tensor | None = None):
        """quantized (B, K, D) -> (logits (B, L, K), images decoded with S_hat or None)."""
        logits = self.recovery(quantized)  # Eq. (9)
        if self.decoder is None:
            return logits, None
        s_hat = canonical_source(logits.detach())  # S_hat of Eq. (10), canonical
        return logits, self.decoder(token_recovery(quantized, s_hat))  # Eq. (14)-(15)


def check_settings(settings: dict, where: str = "generator.recovery_finetune") -> None:
    if settings["source_type"] not in SOURCE_TYPES:
        raise ConfigError(f"{where}.source_type: {settings['source_type']!r} is not one of {SOURCE_TYPES}")
    aug = settings.get("augment")
    if aug is not None and not 0.0 < float(aug["fraction"]) <= 1.0:
        raise ConfigError(f"{where}.augment.fraction: {aug['fraction']} is not in (0, 1]")


def finetune_steps(settings: dict, num_images: int, variant: str) -> int:
    """Optimiser steps of `epochs` passes over `num_images` at the global batch size; `epochs` is
    one number or one per variant ({G: 2, G+R: 16, ...})."""
    epochs = settings["epochs"]
    if isinstance(epochs, dict):
        if variant not in epochs:
            raise ConfigError(f"generator.recovery_finetune.epochs has no entry for variant {variant!r} "
                              f"(it has {sorted(epochs)})")
        epochs = epochs[variant]
    per_epoch = num_images // int(settings["batch_size"])
    if per_epoch < 1:
        raise ConfigError(f"generator.recovery_finetune.batch_size {settings['batch_size']} exceeds the "
                          f"{num_images} training images")
    return int(epochs) * per_epoch


class RecoveryFinetuneStage:
    """Source-Recovery fine-tuning of one stage-1 tokenizer; a Stage of mergevq.train.loop.fit."""

    def __init__(self, cfg: dict, tokenizer_path: str | Path, num_images: int, dist: DistEnv,
                 generator_path: str | Path | None = None, init_path: str | Path | None = None):
        from mergevq.eval.fidelity import sha256_file

        self.cfg, self.dist, self.device = cfg, dist, dist.device
        self.settings = cfg["generator"]["recovery_finetune"] if generator_path is None else generation_settings(cfg)
        check_settings(self.settings)
        tokenizer, art = load_tokenizer(tokenizer_path)  # EMA weights, eval mode
        self.variant = art["variant"]
        self.name = f"finetune-recovery {self.variant}"
        vc = variant_config(cfg, self.variant)
        if tokenizer.num_tokens != vc["tokens"] or tokenizer.resolution != cfg["data"]["resolution"]:
            raise ConfigError(f"tokenizer {tokenizer_path} ({tokenizer.num_tokens} tokens at {tokenizer.resolution} px) "
                              f"does not match tokenizer.variants.{self.variant} ({vc['tokens']} tokens) at "
                              f"data.resolution {cfg['data']['resolution']}")
        self.tokenizer_sha256 = sha256_file(tokenizer_path)
        self.total_steps = total_steps = finetune_steps(self.settings, num_images, self.variant)
        self.kept_target = int(art["kept"])
        self.sampler = MergeRatioSampler.from_config(vc["merge_sampling"])
        self.generator, self.generator_sha256 = None, None
        if generator_path is not None:  # fine-tuning for RandAR: its K, its codes mixed in
            from mergevq.eval.sampling import load_generator_artifact

            self.generator, gen_art = load_generator_artifact(generator_path)
            self.generator = self.generator.to(self.device).requires_grad_(False)
            if self.generator.config.kind != "randar" or gen_art["codes"]["tokenizer_sha256"] != self.tokenizer_sha256:
                raise ValueError(f"{generator_path}: not a RandAR generator trained on codes of {tokenizer_path}")
            self.kept_target = int(gen_art["codes"]["kept"])
            self.generator_sha256 = sha256_file(generator_path)
        self.recon_type = vc["loss"]["recon_type"]
        self.tokenizer = tokenizer.to(self.device).requires_grad_(False)
        decoder = (copy.deepcopy(tokenizer.decoder).requires_grad_(True)
                   if self.settings["finetune_decoder"] else None)
        self.trainee = RecoveryTrainee(copy.deepcopy(tokenizer.recovery).requires_grad_(True), decoder).to(self.device)
        if init_path is not None:  # start from a fine-tuned recovery (and its S_hat decoder)
            from mergevq.tokenizer.recovery import load_recovery

            init = load_recovery(init_path, tokenizer, self.tokenizer_sha256)
            self.trainee.recovery.load_state_dict(init.recovery.state_dict())
            if decoder is not None:
                self.trainee.decoder.load_state_dict(init.decoder.state_dict())
        self.train_module = self.trainee
        if dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.train_module = DDP(self.trainee, device_ids=ids)
        s = self.settings
        self.opt = torch.optim.AdamW(self.trainee.parameters(), lr=float(s["lr"]), betas=tuple(s["betas"]),
                                     weight_decay=float(s["weight_decay"]))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(s["scheduler"], total_steps, 0, s.get("step_milestones", (0.5, 0.75))))
        from mergevq.eval.tokenizer_eval import evaluation_images

        with torch.random.fork_rng(devices=[]):  # a DataLoader draws its seed from the global RNG
            self.val_images = evaluation_images(cfg, "val", int(vc["train"]["val_images"]))[0]

    # -- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, images: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer.encode(images, kept)
        return self.tokenizer.quantizer(encoded.z).quantized, encoded.source  # (B, K, D), (B, K, L)

    @torch.no_grad()
    def _mix_generated(self, quantized: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Replace the first `mix` share of the batch's codes by the generator's teacher-forced
        predictions; returns the codes and the share of replaced tokens that changed."""
        from mergevq.tokenizer.lfq import codes_to_indices

        n = round(float(self.settings["mix"]) * quantized.shape[0])
        if n == 0:
            return quantized, 0.0
        real = codes_to_indices(quantized[:n])
        pred = teacher_forced_predictions(self.generator, real, labels[:n].to(self.device), self.settings["predictions"])
        bits = self.tokenizer.config.bits
        mixed = torch.cat([indices_to_codes(pred, bits).to(quantized.dtype), quantized[n:]])
        return mixed, float((pred != real).float().mean())

    def train_step(self, batch, step: int) -> dict[str, float]:
        images = batch[0].to(self.device, non_blocking=True)
        aug = self.settings.get("augment")
        if aug is not None:  # global RNG: exact resume
            n = round(float(aug["fraction"]) * images.shape[0])
            images = torch.cat([random_affine(images[:n], float(aug["degrees"]), float(aug["translate"])), images[n:]])
        extra = {}
        if self.generator is None:
            kept = self.sampler.sample(step, self.cfg["seed"])  # same on every rank, exact on resume
            quantized, source = self._encode(images, kept)
        else:  # the generator's K; a share of the codes are its predictions (global RNG: exact resume)
            kept = self.kept_target
            quantized, source = self._encode(images, kept)
            quantized, extra["generated_code_changed"] = self._mix_generated(quantized, batch[1])
        self.trainee.train()
        logits, recon = self.train_module(quantized)
        terms = {"source": source_recovery_loss(logits, source, self.settings["source_type"])}  # Eq. (11)
        total = terms["source"]
        if recon is not None:
            diff = recon.float() - images
            terms["recon_s_hat"] = diff.pow(2).mean() if self.recon_type == "l2" else diff.abs().mean()
            total = total + terms["recon_s_hat"]
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            right = (logits.argmax(-1) == source.argmax(1)).float().mean()
        return {**{k: float(v.detach()) for k, v in terms.items()}, **extra, "loss": float(total.detach()), "kept": kept,
                "lr": self.sched.get_last_lr()[0], "source_accuracy_argmax": float(right)}

    # -- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int, out_dir: Path) -> dict[str, float]:
        """At the variant's kept count on the first `val_images` validation images: S_hat's right
        positions (canonical and per-position argmax) and PSNR of the reconstructions with S and S_hat."""
        from mergevq.eval.reconstruction import psnr

        self.trainee.eval()
        decoder = self.trainee.decoder or self.tokenizer.decoder
        sums = dict.fromkeys(("right", "right_argmax", "psnr_gt", "psnr_pred"), 0.0)
        for i in range(0, len(self.val_images), 128):
            x = self.val_images[i:i + 128].to(self.device).float().div(127.5).sub(1)
            quantized, source = self._encode(x, self.kept_target)
            logits = self.trainee.recovery(quantized)
            s_hat = canonical_source(logits)
            sums["right"] += float((s_hat.argmax(1) == source.argmax(1)).float().mean(1).sum())
            sums["right_argmax"] += float((logits.argmax(-1) == source.argmax(1)).float().mean(1).sum())
            sums["psnr_gt"] += float(psnr(self.tokenizer.decode(quantized, source).clamp(-1, 1), x).sum())
            sums["psnr_pred"] += float(psnr(decoder(token_recovery(quantized, s_hat)).clamp(-1, 1), x).sum())
        n = len(self.val_images)
        return {"source_accuracy": sums["right"] / n, "source_accuracy_argmax": sums["right_argmax"] / n,
                "psnr_gt_source": sums["psnr_gt"] / n, "psnr_pred_source": sums["psnr_pred"] / n,
                "kept": self.kept_target}

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"trainee": self.trainee.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.trainee.load_state_dict(state["trainee"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])

    def artifact(self) -> dict:
        return recovery_artifact(self.trainee.recovery, self.trainee.decoder, variant=self.variant,
                                 tokenizer_sha256=self.tokenizer_sha256, kept=self.kept_target,
                                 settings=dict(self.settings), generator_sha256=self.generator_sha256)


# -- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config YAML (generator.recovery_finetune)")
    parser.add_argument("--tokenizer", required=True, help="the stage-1 model.pt (frozen)")
    parser.add_argument("--out", required=True, help="output directory (model.pt, last.ckpt, metrics.csv, ...)")
    parser.add_argument("--generator", default=None,
                        help="fine-tune for generation with this RandAR model.pt (generator.recovery_randar)")
    parser.add_argument("--init", default=None, help="start from this fine-tuned recovery (recovery/model.pt)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from mergevq.data import build_dataset
    from mergevq.train.loop import LoopConfig, fit

    cfg = load_config(args.config, args.set)
    if cfg["generator"].get("recovery_finetune") is None:
        raise ConfigError(f"{args.config}: generator.recovery_finetune: missing (lr, batch_size, epochs, ...)")
    settings = cfg["generator"]["recovery_finetune"] if args.generator is None else generation_settings(cfg)
    if not Path(args.tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer not found: {args.tokenizer} (a stage-1 model.pt from `mergevq train-tokenizer`)")
    dist = DistEnv.from_env()
    dataset = build_dataset(cfg, "train", transform="train")
    torch.manual_seed(cfg["seed"])
    stage = RecoveryFinetuneStage(cfg, args.tokenizer, len(dataset), dist, args.generator, args.init)
    steps = stage.total_steps
    loop = LoopConfig(total_steps=steps, batch_size=int(settings["batch_size"]), seed=cfg["seed"],
                      log_every=max(1, min(50, steps // 20)), val_every=max(1, steps // 4),
                      ckpt_every=max(1, steps // 4), max_steps=args.max_steps,
                      num_workers=cfg["data"].get("num_workers", 0))
    # the rerun trigger: what this run reads besides the tokenizer file, whose hash is in the artefact
    hashed = {"recovery_finetune": settings, "data": cfg["data"], "seed": cfg["seed"],
              "variant": variant_config(cfg, stage.variant), "tokenizer_sha256": stage.tokenizer_sha256,
              **({"generator_sha256": stage.generator_sha256} if args.generator else {})}
    try:
        return fit(stage, dataset, loop, args.out, cfg, config_hash(hashed), dist)
    finally:
        dist.cleanup()
