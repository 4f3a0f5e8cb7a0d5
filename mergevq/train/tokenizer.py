"""Stage 1: train a MergeVQ tokenizer (Sec. 3, App. A.1, A.3, Table A1) with the shared loop.

Per step (batch x, kept count K drawn by the merge-ratio sampler, Eq. 19/20):
  generator: recon (L2/L1) + perceptual (LPIPS) + commitment + LFQ entropy + source (Eq. 11)
             + alignment (Eq. 12) + adversarial (non-saturating or hinge, `gen_adv_loss`, from
             `gan_start`), one AdamW step
  discriminator (from `gan_start`): hinge + LeCam, one AdamW step
  EMA of the tokenizer weights (and of the self-distillation teacher when `teacher: ema`)
Alignment teachers (`tokenizer.loss.teacher`): dinov2 (frozen DINOv2-Base, the paper), ssl (frozen
SimCLR CNN from `mergevq train-ssl-teacher`, the offline demo), ema (DINO self-distillation).
Alignment views (`tokenizer.loss.align_student`, see `alignment_views`): separate (the authors')
runs the student's own encoder pass on a strongly augmented view at `align_resolution` while the
teacher sees a weakly augmented one; reconstruction reads the student feature from the
reconstruction pass and gives the teacher a random-resized crop (cheaper; this package's earlier
default).

`mergevq train-tokenizer --config C --variant V --out DIR [--max-steps N] [--teacher SSL_MODEL_PT]`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from mergevq.config import ConfigError, config_hash, load_config, variant_config
from mergevq.data import build_dataset
from mergevq.data.augment import random_resized_crop
from mergevq.data.datasets import to_unit_range
from mergevq.data.merge_sampling import MergeRatioSampler
from mergevq.losses import DINOv2Teacher, EMASelfDistillation, PerceptualLoss, ProjectionHead, alignment_loss
from mergevq.tokenizer import MergeVQ, TokenizerConfig, build_tokenizer
from mergevq.tokenizer.discriminator import (LeCam, PatchGANDiscriminator, adaptive_generator_weight,
                                             generator_adversarial_loss, hinge_d_loss)
from mergevq.tokenizer.lfq import codebook_usage
from mergevq.train.distributed import DistEnv
from mergevq.train.ema import ModelEMA
from mergevq.train.loop import LoopConfig, fit
from mergevq.train.schedule import lr_lambda
from mergevq.weights import require_weight



ALIGN_FEATURES = ("cls", "tokens_mean")
ALIGN_STUDENTS = ("separate", "reconstruction")


def align_feature(encoded, kind: str) -> torch.Tensor:
    """The (B, d) encoder feature Eq. (12) aligns (`tokenizer.loss.align_feature`).

    cls          the cls token's output, as the authors' release aligns it ("CLS tokens" in Eq. 12);
    tokens_mean  the K merged tokens Z_K averaged: Sec. 3.1 says the alignment is imposed "on Z_K"
                 to give the semantic tokens rich semantics, and this is the feature the linear
                 probe reads (mergevq.eval.probe_cli.pool_features).
    """
    if kind == "cls":
        return encoded.global_feature
    if kind == "tokens_mean":
        return encoded.hidden.mean(dim=1)
    raise ValueError(f"unknown alignment feature {kind!r}; expected one of {ALIGN_FEATURES}")


class AlignBranch(nn.Module):
    """images -> projection-head logits of the aligned feature (ALIGN_FEATURES): the student of Eq. (12)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, feature: str = "cls"):
        super().__init__()
        self.encoder, self.head, self.feature = encoder, head, feature

    def forward(self, images: torch.Tensor, kept: int) -> torch.Tensor:
        # alignment views may have another size than the reconstruction (224 px of a 256-px model)
        return self.head(align_feature(self.encoder(images, kept, any_resolution=True), self.feature))


def view_kept(kept: int, num_tokens: int, view_tokens: int) -> int:
    """K of an alignment view with view_tokens tokens: the reconstruction's merge ratio K / L kept,
    round(K * L_view / L) in [1, L_view] (G+R at 224 px: 144 of 256 -> 110 of 196).

    The authors' encoder instead repeats the reconstruction's per-layer merge counts, which leaves
    L_view - (L - K) tokens (84 for G+R, 16 for G at K = 256) and has no solution for R
    (220 merges of 196 tokens at K = 36).
    """
    return min(view_tokens, max(1, round(kept * view_tokens / num_tokens)))


class AlignmentViews(NamedTuple):
    student: torch.Tensor  # (B, 3, r, r) the student's view u of Eq. (12)
    teacher: torch.Tensor  # (B, 3, r', r') the teacher's view v
    kept: int  # K of the student's own encoder pass (separate), or the reconstruction's K


def alignment_views(images: torch.Tensor, kept: int, num_tokens: int, factor: int, student: str,
                    resolution: int | None, crop_scale, flip: bool) -> AlignmentViews:
    """The two views of Eq. (12) from a batch (B, 3, H, W) in [-1, 1] and the student pass's K.

    separate (the authors'): independent views, student = random-resized crop covering crop_scale
      of the area (+ flip) at `resolution` px (strong), teacher = a random `resolution`-px crop
      (weak; a translation, no resize); the student pass keeps K by `view_kept`.
    reconstruction: the student reads the reconstruction pass (its view is the image itself, K
      unchanged); the teacher sees a random-resized crop of 40-100% of the area.
    Randomness from the global torch RNG (saved in checkpoints: exact resume).
    """
    H = images.shape[-1]
    if student == "reconstruction":
        return AlignmentViews(images, random_resized_crop(images, flip=flip), kept)
    if student != "separate":
        raise ValueError(f"tokenizer.loss.align_student {student!r} is not one of {ALIGN_STUDENTS}")
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"tokenizer.loss.align_crop_scale {list(crop_scale)} is not an area range 0 < min <= max <= 1")
    r = resolution or H
    if r > H or r % factor:
        raise ValueError(f"tokenizer.loss.align_resolution {r} must be at most data.resolution {H} and a "
                         f"multiple of the encoder's downsampling factor {factor}")
    area = (r / H) ** 2  # an r x r window of the H x H image
    teacher = random_resized_crop(images, scale=(area, area), flip=False, size=r)
    student_view = random_resized_crop(images, scale=tuple(crop_scale), flip=flip, size=r)
    return AlignmentViews(student_view, teacher, view_kept(kept, num_tokens, (r // factor) ** 2))


class Student(nn.Module):
    """Everything the generator step trains, as one module so DDP can wrap it."""

    def __init__(self, tokenizer: MergeVQ, align_head: nn.Module | None, align_on: str = "cls"):
        super().__init__()
        self.tokenizer, self.align_head, self.align_on = tokenizer, align_head, align_on

    def forward(self, images, kept, source_grad_to_encoder=True, source_loss_type="bce",
                align_images=None, align_kept=None):
        """The reconstruction pass, and the alignment logits: of a separate student encoder pass on
        align_images at align_kept when given (one forward call, as DDP needs), else of the
        reconstruction pass's encoder output."""
        out = self.tokenizer(images, kept, source_grad_to_encoder=source_grad_to_encoder,
                             source_loss_type=source_loss_type)
        align = None
        if self.align_head is not None:
            encoded = (out.encoded if align_images is None else
                       self.tokenizer.encoder(align_images, align_kept, any_resolution=True))
            align = self.align_head(align_feature(encoded, self.align_on))
        return out, align


class TokenizerStage:
    """Stage-1 state and step for one variant; used by mergevq.train.loop.fit."""

    def __init__(self, cfg: dict, variant: str, dist: DistEnv, teacher_path: str | None = None,
                 kept: int | None = None):
        self.cfg, self.name, self.dist = cfg, variant, dist
        vc = variant_config(cfg, variant, kept)  # kept: trained for this K (Table 4's per-K protocol)
        self.vc, self.tr, self.ls = vc, vc["train"], vc["loss"]
        self.device = dist.device
        self.kept_target = vc["kept"]
        self.sampler = MergeRatioSampler.from_config(vc["merge_sampling"])
        self.tokenizer = build_tokenizer(vc["preset"], bits=vc["codebook_bits"], kept=vc["kept"],
                                         entropy_temperature=self.ls["entropy_temperature"],
                                         codebook_entropy=self.ls["codebook_entropy"],
                                         entropy_group_bits=self.ls["entropy_group_bits"],
                                         **vc.get("model_overrides", {})).to(self.device)
        if self.tokenizer.num_tokens != vc["tokens"]:
            raise ValueError(f"tokenizer.variants.{variant}.tokens = {vc['tokens']} but preset "
                             f"{vc['preset']!r} makes {self.tokenizer.num_tokens} tokens at its resolution")
        if self.tokenizer.resolution != cfg["data"]["resolution"]:
            raise ValueError(f"preset {vc['preset']!r} is built for {self.tokenizer.resolution} px but "
                             f"data.resolution is {cfg['data']['resolution']}")
        if self.tokenizer.config.dinov2_init:  # weight selection from DINOv2-Base (G, G+R; App. A.1)
            from mergevq.tokenizer import init_from_dinov2

            init_from_dinov2(self.tokenizer.encoder, require_weight(cfg, "dinov2_base"))
        width = self.tokenizer.encoder.dim  # the global (CLS) feature's width
        # Alignment (Eq. 12): head on the encoder's global feature.
        self.teacher = self.distill = None
        head = None
        if self.ls["align"] > 0:
            if self.ls["teacher"] in ("dinov2", "ssl"):
                if self.ls["teacher"] == "dinov2":
                    self.teacher = DINOv2Teacher(require_weight(cfg, "dinov2_base")).to(self.device)
                else:
                    if teacher_path is None:
                        raise ConfigError("tokenizer.loss.teacher is 'ssl': pass the teacher's model.pt with "
                                          "--teacher (made by `mergevq train-ssl-teacher`, the DAG's "
                                          "train_ssl_teacher rule)")
                    from mergevq.train.ssl_teacher import SSLTeacher

                    self.teacher = SSLTeacher(teacher_path).to(self.device)
                # the authors' `dist_head: layer3`: d -> 4d -> 4d -> teacher width, no bottleneck
                head = ProjectionHead(width, self.teacher.embed_dim, hidden_dim=4 * width, bottleneck_dim=None,
                                      normalize=False)
            else:
                head = ProjectionHead(width, 256, hidden_dim=max(256, 2 * width), bottleneck_dim=64)
        align_on = self.ls.get("align_feature", "cls")
        self.student = Student(self.tokenizer, head, align_on).to(self.device)
        if self.ls["align"] > 0 and self.ls["teacher"] == "ema":
            self.distill = EMASelfDistillation(AlignBranch(self.tokenizer.encoder, head, align_on), out_dim=256,
                                               momentum=self.ls.get("teacher_momentum", 0.996)).to(self.device)
        self.ema = ModelEMA(self.tokenizer, self.tr["ema_decay"])
        self.perceptual = (PerceptualLoss(require_weight(cfg, "vgg16")).to(self.device)
                           if self.ls["perceptual"] > 0 else None)
        self.use_gan = self.ls["gan"] > 0
        self.disc = (PatchGANDiscriminator(norm=self.ls["discriminator_norm"]).to(self.device)
                     if self.use_gan else None)
        self.lecam = LeCam(self.ls["lecam_ema"]).to(self.device) if self.use_gan else None
        self.train_module = self.student
        if dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.train_module = DDP(self.student, device_ids=ids, find_unused_parameters=True)
            if self.disc is not None:
                self.disc = DDP(self.disc, device_ids=ids)
        kw = dict(lr=self.tr["lr"], betas=tuple(self.tr["betas"]), weight_decay=self.tr["weight_decay"])
        self.opt_g = torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad], **kw)
        self.lr_multiplier = lr_lambda(self.tr["scheduler"], vc["steps"], self.tr["warmup_steps"],
                                       self.tr["step_milestones"])
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, self.lr_multiplier)
        self.opt_d = None
        if self.disc is not None:
            self.opt_d = torch.optim.AdamW(self.disc.parameters(), **kw)
        self.autocast = (dict(device_type="cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" and self.tr["precision"] == "bf16" else None)
        self.val_images = None

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, batch, step: int) -> dict[str, float]:
        images = batch[0].to(self.device, non_blocking=True)
        kept = self.sampler.sample(step, self.cfg["seed"])  # same on every rank, exact on resume
        ls = self.ls
        gan_on = self.use_gan and step >= ls["gan_start"]
        self.student.train()
        views = None
        if self.student.align_head is not None:
            views = alignment_views(images, kept, self.tokenizer.num_tokens, self.tokenizer.encoder.stem.factor,
                                    ls["align_student"], ls["align_resolution"], ls["align_crop_scale"],
                                    flip=self.cfg["data"]["dataset"] != "digits")
        separate = views is not None and ls["align_student"] == "separate"
        with torch.autocast(**self.autocast) if self.autocast else contextlib.nullcontext():
            out, align_logits = self.train_module(images, kept, ls["source_grad_to_encoder"], ls["source_type"],
                                                  views.student if separate else None,
                                                  views.kept if separate else None)
            recon = out.reconstruction.float()
            rec = (recon - images).pow(2).mean() if ls["recon_type"] == "l2" else (recon - images).abs().mean()
            terms = {"recon": rec, "commitment": out.quant.commitment_loss, "entropy": out.quant.entropy_loss,
                     "source": out.source_loss}
            total = (ls["recon"] * rec + ls["commitment"] * out.quant.commitment_loss
                     + ls["entropy"] * out.quant.entropy_loss + ls["source"] * out.source_loss)
            if self.perceptual is not None:
                terms["perceptual"] = self.perceptual(recon, images)
                total = total + ls["perceptual"] * terms["perceptual"]
            if align_logits is not None:
                if self.teacher is not None:
                    terms["align"] = alignment_loss(align_logits.float(), self.teacher(views.teacher),
                                                    ls["align_temperature"])
                else:
                    terms["align"] = self.distill.loss(align_logits.float(),
                                                       self.distill.teacher_forward(views.teacher, views.kept))
                total = total + ls["align"] * terms["align"]
            if gan_on:
                g_adv = generator_adversarial_loss(self.disc(recon), ls["gen_adv_loss"])
                weight = ls["gan"]
                if ls["adaptive_gan"]:
                    weight = weight * adaptive_generator_weight(
                        ls["recon"] * rec, g_adv, self.tokenizer.decoder.conv_out.weight, ls["adaptive_gan_factor"])
                terms["g_adv"] = g_adv
                total = total + weight * g_adv
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        if self.tr["grad_clip"]:
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.tr["grad_clip"])
        self.opt_g.step()
        self.sched_g.step()
        self.ema.update(self.tokenizer)
        if self.distill is not None:
            self.distill.update(AlignBranch(self.tokenizer.encoder, self.student.align_head, self.student.align_on))
        if gan_on:
            with torch.autocast(**self.autocast) if self.autocast else contextlib.nullcontext():
                logits_real = self.disc(images)
                logits_fake = self.disc(recon.detach())
                d_loss = hinge_d_loss(logits_real, logits_fake)
                d_total = d_loss + ls["lecam"] * self.lecam(logits_real.float(), logits_fake.float())
            for group in self.opt_d.param_groups:  # same schedule as the generator, counted from step 0
                group["lr"] = self.tr["lr"] * self.lr_multiplier(step)
            self.opt_d.zero_grad(set_to_none=True)
            d_total.backward()
            self.opt_d.step()
        usage = codebook_usage(out.quant.indices.detach(), self.tokenizer.config.bits)
        metrics = {k: float(v.detach()) for k, v in terms.items()}
        metrics.update(loss=float(total.detach()), kept=kept, lr=self.sched_g.get_last_lr()[0],
                       per_sample_entropy=float(out.quant.per_sample_entropy.detach()),
                       codebook_entropy=float(out.quant.codebook_entropy.detach()),
                       batch_code_diversity=usage.used_codes / min(out.quant.indices.numel(), 2 ** self.tokenizer.config.bits),
                       batch_perplexity=float(usage.perplexity))
        if gan_on:
            metrics["d_loss"] = float(d_loss.detach())
        return metrics

    def warnings(self, metrics: dict) -> list[str]:
        floor = self.tr.get("usage_floor", 0.0)
        if floor and metrics["batch_code_diversity"] < floor:
            return [f"codebook collapse? only {metrics['batch_code_diversity']:.1%} distinct codes per batch "
                    f"(floor {floor:.0%}; entropy weight {self.ls['entropy']})"]
        return []

    # -- validation --------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int, out_dir: Path) -> dict[str, float]:
        # the scoring of `mergevq evaluate`, on a fixed subset (imported here: it imports this module)
        from mergevq.eval.tokenizer_eval import evaluation_images, reconstruct
        from mergevq.report.images import save_reconstruction_grid

        if self.val_images is None:
            self.val_images = evaluation_images(self.cfg, "val", self.tr["val_images"])[0]  # uint8
        model = self.ema.module
        _, _, per_image, owner_true, owner_pred, indices = reconstruct(
            model, self.val_images, self.kept_target, self.device)
        usage = codebook_usage(indices, model.config.bits)
        save_reconstruction_grid(model, to_unit_range(self.val_images[:8]), [self.kept_target],
                                 out_dir / "recon_grid.png", self.device)
        return {"psnr_gt_source": float(per_image["psnr_gt"].mean()),
                "psnr_pred_source": float(per_image["psnr_pred"].mean()),
                "source_accuracy": float((owner_pred == owner_true).float().mean()),
                "codebook_usage": float(usage.usage), "codebook_perplexity": float(usage.perplexity),
                "kept": self.kept_target}

    # -- state ---------------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module]:
        mods = {"student": self.student, "ema": self.ema}
        if self.disc is not None:
            mods |= {"disc": _unwrap(self.disc), "lecam": self.lecam}
        if self.distill is not None:
            mods["distill"] = self.distill
        return mods

    def state_dict(self) -> dict:
        state = {k: m.state_dict() for k, m in self._modules().items()}
        state |= {"opt_g": self.opt_g.state_dict(), "sched_g": self.sched_g.state_dict()}
        if self.opt_d is not None:
            state["opt_d"] = self.opt_d.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        for k, m in self._modules().items():
            m.load_state_dict(state[k])
        self.opt_g.load_state_dict(state["opt_g"])
        self.sched_g.load_state_dict(state["sched_g"])
        if self.opt_d is not None:
            self.opt_d.load_state_dict(state["opt_d"])

    def artifact(self) -> dict:
        return {"variant": self.name, "preset": self.vc["preset"],
                "tokenizer_config": dataclasses.asdict(self.tokenizer.config),
                "ema": self.ema.module.state_dict(), "model": self.tokenizer.state_dict(),
                "kept": self.kept_target, "tokens": self.vc["tokens"],
                "trained_for_kept": self.vc["trained_for_kept"]}


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


# -- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="resolved or source YAML config")
    parser.add_argument("--variant", required=True, choices=["G", "G+R", "R"])
    parser.add_argument("--out", required=True, help="output directory (last.ckpt, model.pt, metrics.csv, ...)")
    parser.add_argument("--kept", type=int, default=None,
                        help="train for this kept count K: target K and the merge-ratio sampler moved to sit "
                             "around it (Table 4's per-K protocol; default: the variant's own target)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many steps (schedules still span the config's `steps`)")
    parser.add_argument("--teacher", default=None,
                        help="the SSL teacher's model.pt (needed when tokenizer.loss.teacher is 'ssl')")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    vc = variant_config(cfg, args.variant, args.kept)
    dist = DistEnv.from_env()
    torch.manual_seed(cfg["seed"])  # model initialisation is identical on every rank
    stage = TokenizerStage(cfg, args.variant, dist, teacher_path=args.teacher, kept=args.kept)
    tr = vc["train"]
    loop = LoopConfig(total_steps=vc["steps"], batch_size=tr["batch_size"], seed=cfg["seed"],
                      log_every=tr["log_every"], val_every=tr["val_every"], ckpt_every=tr["ckpt_every"],
                      max_steps=args.max_steps, num_workers=cfg["data"].get("num_workers", 0))
    dataset = build_dataset(cfg, "train", transform="train")
    try:
        return fit(stage, dataset, loop, args.out, cfg, config_hash(cfg), dist)
    finally:
        dist.cleanup()
