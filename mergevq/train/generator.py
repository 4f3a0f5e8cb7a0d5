"""Stage 2: train a class-conditional generator on extracted codes, with the shared loop.

Per step: a batch of code sequences (one of the stored augmentations per image, drawn from the
global RNG so that resume is exact), the generator's teacher-forced cross-entropy summed over its
sub-tokens (the factorised 2^bits head), labels dropped to the null class with p =
`class_dropout` inside the model (training mode only), label smoothing as configured, one AdamW
step (weight decay on matrices and embeddings only, as LlamaGen), gradient clipping, the step /
cosine schedule, an optional EMA. Telemetry: loss per sub-token, tokens/s.

What the generator reads (`sequence`, `model_inputs`):
  llamagen  the code of every grid position in raster order (`position_indices`; at K = L, the
            paper's LlamaGen baseline, these are the K codes themselves);
  mergear   the same L per-position codes x_l = code of position l's owner (Sec. 4.1), at a K drawn
            per sample and step from the stage-2 merge-ratio sampler (`generator.mergear.
            merge_sampling.<variant>`, Fig. 5: G+R (12 + T)^2 in [144, 256], G (16 + T)^2 in
            [256, 1024]) among codes extracted once per K of its support (`MultiKCodeDataset`);
            the model gets kept = K (its merge instruction M(K)) and builds the Eq. (16) mask
            from the codes (code-first-occurrence rule, `mergevq.generator.mergear`);
  randar    the K merged codes in canonical slot order (Sec. 4.2) at the variant's target K; the
            model draws a random slot permutation per sample (global RNG, so resume stays exact).

`mergevq train-generator --config C --generator llamagen|mergear|randar --variant V
 --codes TRAIN.json [TRAIN_K2.json ...] [--val-codes VAL.json] --out DIR [--max-steps N]`:
DIR/model.pt (+ last.ckpt, metrics.csv, val.csv, run.json).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from mergevq.config import ConfigError, config_hash, load_config
from mergevq.data.merge_sampling import MergeRatioSampler
from mergevq.generator.codes import CodeDataset, open_codes, position_indices
from mergevq.train.distributed import DistEnv
from mergevq.train.ema import ModelEMA
from mergevq.train.loop import LoopConfig, fit
from mergevq.train.schedule import lr_lambda

GENERATORS = ("llamagen", "mergear", "randar")
ARTIFACT_FORMAT = "mergevq-generator/1"


def generator_settings(cfg: dict, generator: str) -> dict:
    """The `generator.<name>` block, refusing a generator the config does not describe."""
    block = cfg.get("generator", {}).get(generator)
    if block is None:
        raise ConfigError(f"generator.{generator}: missing (the training settings of the {generator} generator)")
    return block


def generator_hash(cfg: dict, generator: str) -> str:
    """What a trained generator depends on besides its codes: its block, the data's classes, the seed."""
    settings = {k: v for k, v in generator_settings(cfg, generator).items()
                if k not in ("decode_steps", "cfg_scales")}  # sampling settings: no retraining
    return config_hash({"generator": settings, "seed": cfg["seed"],
                        "num_classes": cfg["data"]["num_classes"]})


def resume_hash(cfg: dict, generator: str, codes: CodeDataset) -> str:
    """A checkpoint resumes only under the same settings and codes of the same tokenizer and K."""
    return config_hash({"settings": generator_hash(cfg, generator), "kept": codes.kept,
                        "tokenizer_sha256": codes.manifest["tokenizer"]["sha256"]})


def sequence(generator: str, indices: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """What `generator` is trained on: indices (B, K) merged codes (zero padding past K is never
    read: owner < K), owner (B, L) -> (B, N) codes."""
    if generator in ("llamagen", "mergear"):
        return position_indices(indices, owner)  # raster order over the L grid positions
    if generator == "randar":
        return indices  # the K merged tokens in canonical slot order
    raise ValueError(f"unknown generator {generator!r}; built: {GENERATORS}")


def model_inputs(generator: str, indices: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(codes, kind-specific keyword arguments of model.loss / teacher_forced_logits)."""
    codes = sequence(generator, indices, owner)
    if generator == "mergear":  # the merge instruction M(K): K = owner.max() + 1 (S is a partition)
        return codes, {"kept": owner.amax(1) + 1}
    return codes, {}


def keep_rule_report(codes) -> dict:
    """How often MergeAR's code rule (keep = first occurrence of the code) and the owner rule (first
    position of the merged group, Eq. 16 read on S) disagree on these training codes, per K: the
    share of positions and of sequences with any disagreement (first stored view of each image)."""
    from mergevq.generator.mergear import keep_by_code, keep_by_owner

    parts = codes.parts if hasattr(codes, "parts") else [codes]
    report = {}
    for part in parts:
        data = part.tensors()
        idx, owner = data.indices[:, 0], data.owner[:, 0]
        differ = keep_by_code(position_indices(idx, owner)) != keep_by_owner(owner)
        report[str(part.kept)] = {"positions": float(differ.float().mean()),
                                  "sequences": float(differ.any(1).float().mean()), "images": len(owner)}
    return report


def kept_sampler(settings: dict, variant: str) -> MergeRatioSampler:
    """MergeAR's stage-2 merge-ratio sampler for `variant` (`merge_sampling.<variant>`)."""
    block = (settings.get("merge_sampling") or {}).get(variant)
    if block is None:
        raise ConfigError(f"generator.mergear.merge_sampling.{variant}: missing (the stage-2 merge-ratio "
                          "sampler MergeAR draws K from, Fig. 5)")
    return MergeRatioSampler.from_config(block)


def training_kept(cfg: dict, generator: str, variant: str) -> list[int]:
    """The K values whose codes `generator` trains on: L (LlamaGen, no merging), the stage-2
    sampler's support (MergeAR), the variant's target K (RandAR)."""
    vc = cfg["tokenizer"]["variants"][variant]
    if generator == "llamagen":
        return [int(vc["tokens"])]
    if generator == "mergear":
        return kept_sampler(generator_settings(cfg, generator), variant).support()
    if generator == "randar":
        return [int(vc["kept"])]
    raise ValueError(f"unknown generator {generator!r}; built: {GENERATORS}")


def inference_kept(cfg: dict, generator: str, variant: str) -> int:
    """K of the codes a generator produces at sampling (and is validated / checked for memorisation
    on): L for LlamaGen, the variant's target K for MergeAR (its M(K)) and RandAR (N = K)."""
    vc = cfg["tokenizer"]["variants"][variant]
    return int(vc["tokens"]) if generator == "llamagen" else int(vc["kept"])


def build_for_codes(generator: str, settings: dict, manifest: dict, num_classes: int) -> nn.Module:
    """The generator preset sized for these codes (bits, grid) and classes, with the config's dropout."""
    from mergevq.generator import build_generator

    drop = float(settings["dropout"])  # Table A2's one dropout: residual, FFN and token (input) dropout
    overrides = dict(codebook_bits=int(manifest["bits"]), grid=int(manifest["grid"]), num_classes=num_classes,
                     token_dropout=drop, resid_dropout=drop, ffn_dropout=drop,
                     class_dropout=float(settings["class_dropout"]))
    if generator == "randar":  # N = K merged tokens on a ceil(sqrt(K)) grid (README "Decisions")
        kept = int(manifest["kept"])
        overrides.update(grid=math.isqrt(kept - 1) + 1, seq_len=kept)
    overrides.update(settings.get("model_overrides") or {})
    return build_generator(settings["preset"], **overrides)


class LossModule(nn.Module):
    """model.loss as a forward, so DistributedDataParallel sees (and syncs) the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, codes, labels, label_smoothing: float, **kind_specific):
        return self.model.loss(codes, labels, label_smoothing=label_smoothing, **kind_specific)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on tensors with >= 2 dims (matrices, embeddings), none on norms / biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    if num_images < batch_size:
        raise ConfigError(f"batch_size {batch_size} exceeds the {num_images} training sequences")
    return num_images // batch_size  # the loop drops the last partial batch


class GeneratorStage:
    """Stage-2 state and step for one (generator, tokenizer variant); used by mergevq.train.loop.fit."""

    def __init__(self, cfg: dict, generator: str, variant: str, codes: CodeDataset, dist: DistEnv,
                 val_codes: CodeDataset | None = None):
        if generator not in GENERATORS:
            raise ValueError(f"unknown generator {generator!r}; built: {GENERATORS}")
        self.cfg, self.generator, self.dist = cfg, generator, dist
        self.name = f"{generator}_{variant}"
        self.settings = s = generator_settings(cfg, generator)
        self.manifest = codes.manifest
        if codes.manifest.get("variant") not in (None, variant):
            raise ValueError(f"{codes.path} holds codes of tokenizer variant {codes.manifest['variant']!r}, "
                             f"not {variant!r}")
        self.device = dist.device
        self.kept_probs, self.keep_rule = None, None
        if generator == "mergear":  # K per sample from the stage-2 sampler over the extracted K
            probs = kept_sampler(s, variant).probabilities()
            have = codes.kept if isinstance(codes.kept, list) else [codes.kept]
            if sorted(probs) != have:
                raise ValueError(f"MergeAR on {variant}: the codes hold K = {have}, the stage-2 sampler "
                                 f"generator.mergear.merge_sampling.{variant} draws K = {sorted(probs)}; "
                                 "give one codes manifest per K of its support")
            self.kept_probs = torch.tensor([probs[k] for k in have], dtype=torch.float64)
            self.keep_rule = keep_rule_report(codes)
        elif isinstance(codes.kept, list):
            raise ValueError(f"{generator} trains on codes at one K, got manifests at K = {codes.kept}")
        self.model = build_for_codes(generator, s, codes.manifest, int(cfg["data"]["num_classes"])).to(self.device)
        self.train_module = LossModule(self.model)
        if dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.train_module = DDP(self.train_module, device_ids=ids)
        self.opt = torch.optim.AdamW(param_groups(self.model, float(s["weight_decay"])), lr=float(s["lr"]),
                                     betas=tuple(s["betas"]))
        self.total_steps = int(s["epochs"]) * steps_per_epoch(len(codes), int(s["batch_size"]))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(s.get("scheduler", "constant"), self.total_steps, int(s.get("warmup_steps", 0)),
                                s.get("step_milestones", (0.5, 0.75))))
        self.ema = ModelEMA(self.model, float(s["ema_decay"])) if s.get("ema_decay") else None
        self.autocast = (dict(device_type="cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" and s.get("precision") == "bf16" else None)
        self.val_codes = val_codes
        self._last_time = None

    # -- one step ----------------------------------------------------------------------------
    def pick_view(self, indices: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """indices (B, A, K), owner (B, A, L) -> one stored augmentation per sample (global RNG).

        Codes at several K (B, J, A, Kmax) / (B, J, A, L): first one K per sample, drawn with the
        stage-2 sampler's probabilities (global RNG)."""
        rows = torch.arange(indices.shape[0])
        if indices.dim() == 4:
            j = torch.multinomial(self.kept_probs, indices.shape[0], replacement=True)
            indices, owner = indices[rows, j], owner[rows, j]
        A = indices.shape[1]
        view = torch.randint(A, (indices.shape[0],)) if A > 1 else torch.zeros(indices.shape[0], dtype=torch.long)
        return indices[rows, view], owner[rows, view]

    def train_step(self, batch, step: int) -> dict[str, float]:
        indices, owner, labels = batch
        indices, owner = self.pick_view(indices, owner)
        codes, extra = model_inputs(self.generator, indices, owner)
        codes = codes.to(self.device, non_blocking=True)
        extra = {k: v.to(self.device) for k, v in extra.items()}
        labels = labels.to(self.device, non_blocking=True)
        now = time.perf_counter()
        self.model.train()
        with torch.autocast(**self.autocast) if self.autocast else contextlib.nullcontext():
            out = self.train_module(codes, labels, float(self.settings["label_smoothing"]), **extra)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        metrics = {}
        if self.settings.get("grad_clip"):
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                                        float(self.settings["grad_clip"])))
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model)
        elapsed = time.perf_counter() - (self._last_time if self._last_time is not None else now)
        self._last_time = time.perf_counter()
        metrics.update(loss=float(out.loss.detach()), lr=self.sched.get_last_lr()[0],
                       **{f"ce_{i + 1}": float(ce.detach()) for i, ce in enumerate(out.per_subtoken)})
        if elapsed > 0:  # time since the previous step ended: data, forward, backward, update
            metrics["tokens_per_s"] = codes.numel() * self.dist.world_size / elapsed
        return metrics

    # -- validation --------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int, out_dir: Path) -> dict[str, float]:
        """Teacher-forced CE per sub-token on held-out codes (no label dropping, no smoothing)."""
        if self.val_codes is None:
            return {}
        model = self.ema.module if self.ema is not None else self.model
        model.eval()
        n = min(len(self.val_codes), int(self.settings.get("val_images", len(self.val_codes))))
        totals, count = None, 0
        bs = int(self.settings["batch_size"])
        for lo in range(0, n, bs):
            items = [self.val_codes[i] for i in range(lo, min(n, lo + bs))]
            indices = torch.stack([x[0][0] for x in items])  # the un-augmented view
            owner = torch.stack([x[1][0] for x in items])
            labels = torch.stack([x[2] for x in items]).to(self.device)
            codes, extra = model_inputs(self.generator, indices, owner)
            out = model.loss(codes.to(self.device), labels, label_smoothing=0.0,
                             **{k: v.to(self.device) for k, v in extra.items()})
            terms = torch.stack([out.loss.float(), *[ce.float() for ce in out.per_subtoken]]) * len(items)
            totals = terms if totals is None else totals + terms
            count += len(items)
        totals = (totals / count).tolist()
        result = {"val_loss": totals[0], **{f"val_ce_{i + 1}": v for i, v in enumerate(totals[1:])}}
        result["val_bits_per_code"] = totals[0] / math.log(2)
        return result

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def artifact(self) -> dict:
        """model.pt: the GPTConfig and weights ("model"; the EMA's under "ema" when used, which
        sampling then prefers), and what the codes were (`mergevq.generator.load_generator` reads it)."""
        m = self.manifest
        return {"format": ARTIFACT_FORMAT, "generator": self.generator, "name": self.name,
                "preset": self.settings["preset"], "generator_config": dataclasses.asdict(self.model.config),
                "model": self.model.state_dict(),
                **({"ema": self.ema.module.state_dict()} if self.ema is not None else {}),
                **({"kept_probabilities": self.kept_probs.tolist()} if self.kept_probs is not None else {}),
                **({"keep_rule_disagreement": self.keep_rule} if self.keep_rule is not None else {}),
                "codes": {"variant": m.get("variant"), "kept": m["kept"], "tokens": m["tokens"], "grid": m["grid"],
                          "bits": m["bits"], "tokenizer_sha256": m["tokenizer"]["sha256"]}}


# -- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--generator", required=True, choices=GENERATORS)
    parser.add_argument("--variant", required=True, choices=["G", "G+R", "R"], help="tokenizer variant of the codes")
    parser.add_argument("--codes", required=True, nargs="+",
                        help="training codes manifest (CODES_DIR/train.json); MergeAR: one per K of its sampler")
    parser.add_argument("--val-codes", default=None, help="validation codes manifest (CODES_DIR/val.json)")
    parser.add_argument("--out", required=True, help="output directory (model.pt, last.ckpt, metrics.csv, ...)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def loop_config(settings: dict, total_steps: int, seed: int, max_steps: int | None, num_workers: int) -> LoopConfig:
    return LoopConfig(total_steps=total_steps, batch_size=int(settings["batch_size"]), seed=seed,
                      log_every=int(settings.get("log_every", 100)), val_every=int(settings.get("val_every", total_steps)),
                      ckpt_every=int(settings.get("ckpt_every", 1000)), max_steps=max_steps, num_workers=num_workers)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    dist = DistEnv.from_env()
    codes = open_codes(args.codes)
    val = CodeDataset(args.val_codes) if args.val_codes else None
    if val is not None and val.manifest["tokenizer"]["sha256"] != codes.manifest["tokenizer"]["sha256"]:
        raise ValueError(f"{args.codes} and {args.val_codes} come from different tokenizers")
    torch.manual_seed(cfg["seed"])  # model initialisation is identical on every rank
    stage = GeneratorStage(cfg, args.generator, args.variant, codes, dist, val)
    loop = loop_config(stage.settings, stage.total_steps, cfg["seed"], args.max_steps, cfg["data"].get("num_workers", 0))
    try:
        return fit(stage, codes, loop, args.out, cfg, resume_hash(cfg, args.generator, codes), dist)
    finally:
        dist.cleanup()
