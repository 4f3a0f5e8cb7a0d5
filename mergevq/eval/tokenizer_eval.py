"""`mergevq evaluate`: every stage-1 number of one tokenizer at one kept count K.

Reconstructions of the validation images with the encoder's ground-truth source matrix S and with
Source Recovery's prediction Ŝ (Table 5), scored by PSNR / SSIM / LPIPS, rFID (with a bootstrap
interval over the images, `mergevq.eval.bootstrap.bootstrap_fid`), the demo classifier's accuracy
on them, Ŝ's position accuracy against chance and a position-only baseline, codebook usage /
perplexity over the split, and the encoder / decoder multiply-accumulates per image at K (Table A1
/ Table 4).

Streaming. `evaluate` and `reference-features` read the images batch by batch (uint8, decoded by
``data.num_workers`` DataLoader workers), and each batch is reconstructed, scored and put through
the FID extractor at once. Kept across batches: per-image scores, the FID features (N x D float32:
0.4 GB per set at 50,000 x 2048), the code indices (int32, N x K) and running counts; never the
images (50,000 float images at 256 px are 39 GB, and stacking them doubles that).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from mergevq.config import ConfigError, config_hash, load_config
from mergevq.data.datasets import to_uint8
from mergevq.eval.bootstrap import FID_INTERVAL_DESCRIPTION, FID_INTERVAL_METHOD, bootstrap_fid
from mergevq.eval.fidelity import (DEMO_EXTRACTOR, INCEPTION_EXTRACTOR, SMOKE_THRESHOLD, FeatureAccumulator,
                                   create_extractor, feature_layers, sha256_file)
from mergevq.eval.flops import count_macs
from mergevq.eval.reconstruction import LPIPS, psnr, ssim
from mergevq.files import load_checkpoint, write_json
from mergevq.tokenizer import load_tokenizer
from mergevq.tokenizer.lfq import codebook_usage
from mergevq.tokenizer.recovery import FinetunedRecovery, canonical_owners, load_recovery, source_from_owners
from mergevq.weights import require_weight

POSITION_BASELINE_IMAGES = 1024  # training images that fix each position's usual owner


# ---------------------------------------------------------------------------------------------
# Images, streamed


class UInt8Images(Dataset):
    """(image uint8 (3, R, R), label int) from a dataset of (float image in [-1, 1], label). The
    conversion runs in the DataLoader worker, so a batch crosses between processes at one byte per
    value; to_uint8 of to_unit_range is the identity on uint8 images."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return to_uint8(image), int(label)


def evaluation_loader(cfg: dict, split: str, limit: int | None, batch_size: int) -> DataLoader:
    """Batches (images uint8 (B, 3, R, R), labels (B,)) of the first `limit` images of a split
    (all when None), in a fixed order (evaluation transform), decoded by data.num_workers workers."""
    from mergevq.data import build_dataset

    ds = build_dataset(cfg, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    workers = int(cfg["data"].get("num_workers", 0))
    return DataLoader(Subset(UInt8Images(ds), range(n)), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=False)


def evaluation_images(cfg: dict, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, R, R), labels (N,)) of a split, the first `limit`, held in memory
    (N x 3 x R x R bytes): for the few hundred validation images of a training run. `evaluate`
    streams instead (evaluation_loader)."""
    images, labels = zip(*evaluation_loader(cfg, split, limit, batch_size=256))
    return torch.cat(images), torch.cat(labels)


def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches from a tensor (N, 3, R, R) (sliced) or from an iterable of batches (as is)."""
    if torch.is_tensor(images):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        yield from images


# ---------------------------------------------------------------------------------------------
# Reconstruction and its scores


class ReconstructionBatch(NamedTuple):
    rec_gt: torch.Tensor  # uint8 (B, 3, R, R) decoded with the encoder's S, on the model's device
    rec_pred: torch.Tensor  # uint8 (B, 3, R, R) decoded with Source Recovery's S_hat
    scores: dict[str, torch.Tensor]  # {psnr,ssim[,lpips]}_{gt,pred}: (B,) on the CPU
    owner_true: torch.Tensor  # (B, L) int64 CPU: the merged token each position belongs to (S)
    owner_pred: torch.Tensor  # (B, L) int64 CPU: the same from S_hat
    indices: torch.Tensor  # (B, K) int64 CPU: LFQ code indices
    owner_pred_argmax: torch.Tensor  # (B, L) int64 CPU: Eq. (10)'s per-position argmax (not canonical)
    rec_ft: torch.Tensor | None = None  # uint8: decoded with a fine-tuned recovery's S_hat (`--recovery`)
    owner_ft: torch.Tensor | None = None  # (B, L) int64 CPU: its owners


@torch.no_grad()
def reconstruct_batch(model, images_uint8: torch.Tensor, kept: int, device, lpips=None,
                      finetuned: FinetunedRecovery | None = None) -> ReconstructionBatch:
    """Reconstruct one batch (uint8 (B, 3, R, R)) at K = kept with S and with S_hat (stage-1
    recovery; also the fine-tuned one when given), and score it. S_hat is canonical
    (tokenizer.recovery.canonical_owners)."""
    x = images_uint8.to(device, non_blocking=True).float().div(127.5).sub(1)
    out = model(x, kept)
    owner_pred = canonical_owners(out.source_logits)
    recs = {"gt": out.reconstruction.float().clamp(-1, 1),
            "pred": model.decode(out.quant.quantized, source_from_owners(owner_pred, kept)).float().clamp(-1, 1)}
    owner_ft = None
    if finetuned is not None:
        source_ft = finetuned.source(out.quant.quantized)
        owner_ft = source_ft.argmax(1)
        recs["ft"] = finetuned.decode(out.quant.quantized, source_ft).float().clamp(-1, 1)
    scores = {}
    for tag, rec in recs.items():
        scores[f"psnr_{tag}"] = psnr(rec, x).cpu()
        scores[f"ssim_{tag}"] = ssim(rec, x).cpu()
        if lpips is not None:
            scores[f"lpips_{tag}"] = lpips(rec, x).cpu()
    return ReconstructionBatch(to_uint8(recs["gt"]), to_uint8(recs["pred"]), scores,
                               out.encoded.source.argmax(1).cpu(), owner_pred.cpu(), out.quant.indices.cpu(),
                               out.source_logits.argmax(-1).cpu(),
                               to_uint8(recs["ft"]) if finetuned is not None else None,
                               owner_ft.cpu() if owner_ft is not None else None)


@torch.no_grad()
def reconstruct(model, images_uint8: torch.Tensor, kept: int, device, batch_size: int = 64, lpips=None):
    """Reconstruct images held in memory (uint8 (N, 3, R, R)) with S and with S_hat: (rec_gt,
    rec_pred uint8 (N, 3, R, R) CPU, per-image scores {name: (N,)}, owner_true, owner_pred (N, L),
    indices (N * K,)). The training run's validation; `evaluate` streams reconstruct_batch."""
    parts = [reconstruct_batch(model, x, kept, device, lpips)
             for x in tqdm(_batches(images_uint8, batch_size), desc=f"reconstruct K={kept}", leave=False)]
    return (torch.cat([b.rec_gt.cpu() for b in parts]), torch.cat([b.rec_pred.cpu() for b in parts]),
            {k: torch.cat([b.scores[k] for b in parts]) for k in parts[0].scores},
            torch.cat([b.owner_true for b in parts]), torch.cat([b.owner_pred for b in parts]),
            torch.cat([b.indices.flatten() for b in parts]))


@torch.no_grad()
def position_baseline(model, images_uint8: torch.Tensor | Iterable[torch.Tensor], kept: int, device,
                      batch_size: int = 128) -> torch.Tensor:
    """The owner index most often seen at each position over `images` (training split): (L,).

    images: uint8 (N, 3, R, R) or an iterable of such batches. The merged tokens come out in a
    fixed layout (unmerged even tokens, then odd tokens), so an owner index has a positional
    meaning; this baseline predicts S from position alone."""
    counts = torch.zeros(model.num_tokens, kept, dtype=torch.long)
    for batch in _batches(images_uint8, batch_size):
        x = batch.to(device).float().div(127.5).sub(1)
        owner = model.encode(x, kept).source.argmax(1).cpu()  # (B, L)
        counts.scatter_add_(1, owner.T.contiguous(), torch.ones_like(owner.T))
    return counts.argmax(1)


def fid_extractor(cfg: dict, classifier: str | None) -> tuple[str, Path]:
    name = cfg["eval"]["fid"]["extractor"]
    if name == DEMO_EXTRACTOR:
        if classifier is None:
            raise ValueError("the demo-classifier FID extractor needs --classifier FILE (its trained weights)")
        return name, Path(classifier)
    return INCEPTION_EXTRACTOR, require_weight(cfg, "inception")


def reference_features(cfg: dict, classifier: str | None = None, progress: bool = True) -> dict:
    """Features of the validation originals under the configured FID extractor, computed once per
    run and reused by every rFID (`mergevq reference-features`), streamed batch by batch."""
    fid_cfg = cfg["eval"]["fid"]
    extractor, weights = fid_extractor(cfg, classifier)
    fid_layer, isc_layer = feature_layers(extractor, weights)
    layers = [fid_layer] + ([isc_layer] if extractor == DEMO_EXTRACTOR else [])
    loader = evaluation_loader(cfg, "val", fid_cfg["num_images"], fid_cfg["batch_size"])  # checks the data first
    features = FeatureAccumulator(create_extractor(extractor, weights, layers))
    labels, resolution = [], None
    for images, y in tqdm(loader, desc="reference features", unit="batch", disable=not progress):
        features.add(images)
        labels.append(y)
        resolution = list(images.shape[-2:])
    labels = torch.cat(labels)
    return {"features": features.features(), "labels": labels, "extractor": extractor,
            "weights_sha256": sha256_file(weights), "fid_layer": fid_layer,
            "isc_layer": isc_layer if extractor == DEMO_EXTRACTOR else None,
            "num_images": len(labels), "resolution": resolution, "config_hash": config_hash(cfg)}


def load_reference(path: str | Path) -> dict:
    """A `mergevq reference-features` file; errors name the file."""
    ref = load_checkpoint(path)
    missing = {"features", "labels", "weights_sha256", "num_images", "fid_layer", "isc_layer"} - set(ref)
    if missing:
        raise ValueError(f"{path}: not a reference-features file (missing {sorted(missing)}); "
                         "make it with `mergevq reference-features`")
    return ref


def evaluate_tokenizer(cfg: dict, tokenizer_path: str | Path, kept: int, reference: dict,
                       classifier: str | None = None, device=None, progress: bool = True,
                       recovery: str | Path | None = None) -> dict:
    """The metrics JSON of `mergevq evaluate` (module docstring) for the tokenizer at K = kept.

    reference: `reference_features` of the same config (or `load_reference` of its file).
    recovery: a `mergevq finetune-recovery` model.pt of this tokenizer: adds the `*_ft` keys
    (reconstructions with its S_hat, decoded by its decoder when it fine-tuned one).
    eval.fid.bootstrap_resamples resamples give each rFID its interval (bootstrap_fid).
    Raises ConfigError if kept is impossible for the tokenizer or its resolution is not data.resolution.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, art = load_tokenizer(tokenizer_path)
    if not 1 <= kept <= model.num_tokens:
        raise ConfigError(f"--kept {kept} is not in [1, {model.num_tokens}] for tokenizer {tokenizer_path} "
                          f"({model.config.name}, {model.num_tokens} tokens)")
    if model.resolution != cfg["data"]["resolution"]:
        raise ConfigError(f"tokenizer {tokenizer_path} is built for {model.resolution} px but data.resolution "
                          f"is {cfg['data']['resolution']}")
    model = model.to(device)
    finetuned = (load_recovery(recovery, model, sha256_file(tokenizer_path)).to(device)
                 if recovery is not None else None)
    fid_cfg = cfg["eval"]["fid"]
    extractor, weights = fid_extractor(cfg, classifier)
    loader = evaluation_loader(cfg, "val", fid_cfg["num_images"], fid_cfg["batch_size"])
    num_images = len(loader.dataset)
    if reference["weights_sha256"] != sha256_file(weights) or reference["num_images"] != num_images:
        raise ValueError(f"the reference features ({reference['num_images']} images, extractor weights sha256 "
                         f"{reference['weights_sha256'][:12]}) do not match this evaluation ({num_images} images, "
                         f"{sha256_file(weights)[:12]}): rerun `mergevq reference-features`")
    lpips = LPIPS(require_weight(cfg, "vgg16")).to(device) if cfg["weights"].get("vgg16") else None
    train = evaluation_loader(cfg, "train", POSITION_BASELINE_IMAGES, fid_cfg["batch_size"])
    baseline = position_baseline(model, (x for x, _ in train), kept, device)

    fid_layer, isc_layer = reference["fid_layer"], reference["isc_layer"]
    feat_extractor = create_extractor(extractor, weights, [fid_layer] + ([isc_layer] if isc_layer else []))
    tags = ("gt", "pred") + (("ft",) if finetuned is not None else ())
    features = {tag: FeatureAccumulator(feat_extractor) for tag in tags}
    source_correct_argmax = source_correct_ft = 0
    scores: dict[str, list[torch.Tensor]] = {}
    labels, indices, first = [], [], None
    source_correct = baseline_correct = positions = 0
    for images, y in tqdm(loader, desc=f"evaluate K={kept}", unit="batch", disable=not progress):
        b = reconstruct_batch(model, images, kept, device, lpips, finetuned)
        features["gt"].add(b.rec_gt)
        features["pred"].add(b.rec_pred)
        source_correct_argmax += int((b.owner_pred_argmax == b.owner_true).sum())
        if finetuned is not None:
            features["ft"].add(b.rec_ft)
            source_correct_ft += int((b.owner_ft == b.owner_true).sum())
        for name, value in b.scores.items():
            scores.setdefault(name, []).append(value)
        source_correct += int((b.owner_pred == b.owner_true).sum())
        baseline_correct += int((baseline[None] == b.owner_true).sum())
        positions += b.owner_true.numel()
        indices.append(b.indices.flatten().to(torch.int32))  # 2^bits <= 2^31 codes
        labels.append(y)
        first = images[:1] if first is None else first
    val_y = torch.cat(labels)
    if not torch.equal(val_y, reference["labels"]):
        raise ValueError("the reference features were computed on other validation images (labels differ); "
                         "rerun `mergevq reference-features`")
    per_image = {k: torch.cat(v) for k, v in scores.items()}
    feats = {tag: acc.features() for tag, acc in features.items()}
    feats["orig"] = reference["features"]

    result = {"variant": art["variant"], "kept": kept, "tokens": model.num_tokens, "num_images": num_images,
              "tokenizer_sha256": sha256_file(tokenizer_path), "config_hash": config_hash(cfg),
              "tokenizer_step": art.get("step"),
              "trained_for_kept": art.get("trained_for_kept")}  # set: Table 4's per-K protocol
    resamples = int(fid_cfg["bootstrap_resamples"])
    for tag in tags:
        result[f"rfid_{tag}"] = bootstrap_fid(feats[tag][fid_layer], feats["orig"][fid_layer], resamples,
                                              cfg["seed"], device=device).as_dict()
        for metric in ("psnr", "ssim", "lpips"):
            key = f"{metric}_{tag}"
            result[key] = float(per_image[key].mean()) if key in per_image else None
        result[f"classifier_top1_recon_{tag}"] = (
            float((feats[tag][isc_layer].argmax(-1) == val_y).float().mean()) if extractor == DEMO_EXTRACTOR else None)
    result["classifier_top1_original"] = (
        float((feats["orig"][isc_layer].argmax(-1) == val_y).float().mean()) if extractor == DEMO_EXTRACTOR else None)
    result["fid_protocol"] = {
        "extractor": extractor,
        "feature_layer": fid_layer, "weights_sha256": sha256_file(weights), "num_images": num_images,
        "resolution": list(first.shape[-2:]), "image_format": "uint8 tensors (no JPEG)",
        "reference": f"{cfg['data']['dataset']} validation originals (first {num_images}, center crop)",
        "bootstrap": {"method": FID_INTERVAL_METHOD, "description": FID_INTERVAL_DESCRIPTION,
                      "resamples": resamples, "level": 0.95, "paired": True, "seed": cfg["seed"]},
        "smoke": num_images < SMOKE_THRESHOLD}
    result["source_accuracy"] = source_correct / positions  # canonical S_hat of the stage-1 recovery
    result["source_accuracy_argmax"] = source_correct_argmax / positions  # Eq. (10) per position
    if finetuned is not None:
        result["source_accuracy_ft"] = source_correct_ft / positions
        result["recovery"] = {"path": str(recovery), "sha256": sha256_file(recovery),
                              "decoder_finetuned": finetuned.decoder_finetuned}
    result["source_accuracy_chance"] = 1.0 / kept  # a uniformly random owner per position
    result["source_accuracy_position_baseline"] = baseline_correct / positions
    usage = codebook_usage(torch.cat(indices), model.config.bits)
    result["codebook_usage"], result["codebook_perplexity"] = float(usage.usage), float(usage.perplexity)
    one = first.to(device).float().div(127.5).sub(1)
    with torch.no_grad():
        quant = model.quantizer(model.encode(one, kept).z).quantized
    result["encoder_gmacs"] = count_macs(model.encoder, one, kept) / 1e9
    result["decoder_gmacs"] = count_macs(model.decoder, torch.zeros(1, model.num_tokens, quant.shape[-1], device=device)) / 1e9
    # K tokens per image: what a stage-2 generator produces for one image (K raster steps at one
    # token per step). Not the paper's Table 4 "#Step", which prints K/4.
    result["tokens_per_image"] = kept
    result["config"] = cfg
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--tokenizer", required=True, help="stage-1 model.pt")
    parser.add_argument("--kept", type=int, required=True, help="kept token count K at inference")
    parser.add_argument("--classifier", help="demo-classifier weights (when eval.fid.extractor is demo-classifier)")
    parser.add_argument("--reference", required=True, help="features of the validation originals (reference-features)")
    parser.add_argument("--recovery", default=None,
                        help="a fine-tuned Source Recovery (finetune-recovery's model.pt) of this tokenizer: "
                             "also score reconstructions with its S_hat (the *_ft keys)")
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides (e.g. eval.fid.bootstrap_resamples=200)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    reference = load_reference(args.reference)
    result = evaluate_tokenizer(cfg, args.tokenizer, args.kept, reference, args.classifier, recovery=args.recovery)
    write_json(args.out, result)
    summary = {k: result[k] for k in ("variant", "kept", "psnr_gt", "psnr_pred", "source_accuracy",
                                      "source_accuracy_position_baseline", "codebook_usage")}
    summary["rfid_gt"] = result["rfid_gt"]["value"]
    print(summary)
    return 0


# `mergevq reference-features`
def add_reference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--classifier", help="demo-classifier weights (when eval.fid.extractor is demo-classifier)")
    parser.add_argument("--out", required=True, help="features file (.pt) to write")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")


def run_reference(args: argparse.Namespace) -> int:
    from mergevq.files import torch_save

    cfg = load_config(args.config, args.set)
    ref = reference_features(cfg, args.classifier)
    torch_save(ref, args.out)
    print(f"reference features: {ref['num_images']} images, {ref['extractor']} layer {ref['fid_layer']} -> {args.out}")
    return 0
