"""`mergevq evaluate`: every stage-1 number of one tokenizer at one kept count K.

Reconstructions of the validation images with the encoder's ground-truth source matrix S and with
Source Recovery's prediction Ŝ (Table 5), scored by PSNR / SSIM / LPIPS, rFID (with a bootstrap
interval over the images), the demo classifier's accuracy on them, Ŝ's position accuracy against
chance and a position-only baseline, codebook usage / perplexity over the split, and the
encoder / decoder multiply-accumulates per image at K (Table A1 / Table 4).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mergevq.config import config_hash, load_config
from mergevq.data.datasets import to_uint8
from mergevq.eval.fidelity import (DEMO_EXTRACTOR, INCEPTION_EXTRACTOR, SMOKE_THRESHOLD, extract_features,
                                   feature_layers, frechet_distance, sha256_file, statistics_from_features)
from mergevq.eval.flops import count_macs
from mergevq.eval.reconstruction import LPIPS, psnr, ssim
from mergevq.files import write_json
from mergevq.tokenizer.lfq import codebook_usage
from mergevq.tokenizer.recovery import source_from_logits
from mergevq.tokenizer import load_tokenizer
from mergevq.weights import require_weight


def evaluation_images(cfg: dict, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, R, R), labels (N,)) of a split, the first `limit` in a fixed order."""
    from mergevq.data import build_dataset

    ds = build_dataset(cfg, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    items = [ds[i] for i in range(n)]
    return to_uint8(torch.stack([x for x, _ in items])), torch.tensor([int(y) for _, y in items])


@torch.no_grad()
def position_baseline(model, images_uint8: torch.Tensor, kept: int, device, batch_size: int = 128) -> torch.Tensor:
    """The owner index most often seen at each position over `images` (training split): (L,).

    The merged tokens come out in a fixed layout (unmerged even tokens, then odd tokens), so an
    owner index has a positional meaning; this baseline predicts S from position alone."""
    counts = torch.zeros(model.num_tokens, kept, dtype=torch.long)
    for i in range(0, len(images_uint8), batch_size):
        x = images_uint8[i:i + batch_size].float().div(127.5).sub(1).to(device)
        owner = model.encode(x, kept).source.argmax(1).cpu()  # (B, L)
        counts.scatter_add_(1, owner.T.contiguous(), torch.ones_like(owner.T))
    return counts.argmax(1)


@torch.no_grad()
def reconstruct(model, images_uint8: torch.Tensor, kept: int, device, batch_size: int = 64, lpips=None):
    """Reconstruct with S and with Ŝ; per-image scores and the uint8 reconstructions."""
    out_gt, out_pred, scores = [], [], {k: [] for k in ("psnr_gt", "psnr_pred", "ssim_gt", "ssim_pred",
                                                         "lpips_gt", "lpips_pred")}
    owners_true, owners_pred, indices = [], [], []
    for i in tqdm(range(0, len(images_uint8), batch_size), desc=f"reconstruct K={kept}", leave=False):
        x = images_uint8[i:i + batch_size].float().div(127.5).sub(1).to(device)
        out = model(x, kept)
        rec_gt = out.reconstruction.float().clamp(-1, 1)
        rec_pred = model.decode(out.quant.quantized, source_from_logits(out.source_logits)).float().clamp(-1, 1)
        for tag, rec in (("gt", rec_gt), ("pred", rec_pred)):
            scores[f"psnr_{tag}"].append(psnr(rec, x).cpu())
            scores[f"ssim_{tag}"].append(ssim(rec, x).cpu())
            if lpips is not None:
                scores[f"lpips_{tag}"].append(lpips(rec, x).cpu())
        out_gt.append(to_uint8(rec_gt).cpu())
        out_pred.append(to_uint8(rec_pred).cpu())
        owners_true.append(out.encoded.source.argmax(1).cpu())
        owners_pred.append(out.source_logits.argmax(-1).cpu())
        indices.append(out.quant.indices.flatten().cpu())
    per_image = {k: torch.cat(v) for k, v in scores.items() if v}
    return (torch.cat(out_gt), torch.cat(out_pred), per_image, torch.cat(owners_true), torch.cat(owners_pred),
            torch.cat(indices))


def bootstrap_fid(feats_a: torch.Tensor, feats_b: torch.Tensor, num: int, seed: int) -> tuple[float, float, float]:
    """FID of paired feature sets and its 95% percentile bootstrap interval over the images."""
    value = frechet_distance(statistics_from_features(feats_a), statistics_from_features(feats_b))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(num):
        idx = torch.from_numpy(rng.integers(0, len(feats_a), len(feats_a)))
        draws.append(frechet_distance(statistics_from_features(feats_a[idx]), statistics_from_features(feats_b[idx])))
    lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan"))
    return float(value), float(lo), float(hi)


def fid_extractor(cfg: dict, classifier: str | None) -> tuple[str, Path]:
    name = cfg["eval"]["fid"]["extractor"]
    if name == DEMO_EXTRACTOR:
        if classifier is None:
            raise ValueError("the demo-classifier FID extractor needs --classifier FILE (its trained weights)")
        return name, Path(classifier)
    return INCEPTION_EXTRACTOR, require_weight(cfg, "inception")


def reference_features(cfg: dict, classifier: str | None = None) -> dict:
    """Features of the validation originals under the configured FID extractor, computed once per
    run and reused by every rFID (`mergevq reference-features`)."""
    fid_cfg = cfg["eval"]["fid"]
    extractor, weights = fid_extractor(cfg, classifier)
    fid_layer, isc_layer = feature_layers(extractor, weights)
    layers = [fid_layer] + ([isc_layer] if extractor == DEMO_EXTRACTOR else [])
    val_x, val_y = evaluation_images(cfg, "val", fid_cfg["num_images"])
    feats = extract_features(val_x, extractor=extractor, weights_path=weights, layers=layers,
                             batch_size=fid_cfg["batch_size"])
    return {"features": feats, "labels": val_y, "extractor": extractor, "weights_sha256": sha256_file(weights),
            "fid_layer": fid_layer, "isc_layer": isc_layer if extractor == DEMO_EXTRACTOR else None,
            "num_images": len(val_x), "resolution": list(val_x.shape[-2:]), "config_hash": config_hash(cfg)}


def evaluate_tokenizer(cfg: dict, tokenizer_path: str | Path, kept: int, reference: dict,
                       classifier: str | None = None, bootstrap: int = 100, device=None) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, art = load_tokenizer(tokenizer_path)
    model = model.to(device)
    if not 1 <= kept <= model.num_tokens:
        raise ValueError(f"--kept {kept} outside [1, {model.num_tokens}] for {tokenizer_path}")
    fid_cfg = cfg["eval"]["fid"]
    val_x, val_y = evaluation_images(cfg, "val", fid_cfg["num_images"])
    train_x, _ = evaluation_images(cfg, "train", 1024)  # enough to find each position's usual owner
    lpips = LPIPS(require_weight(cfg, "vgg16")).to(device) if cfg["weights"].get("vgg16") else None
    rec_gt, rec_pred, per_image, owner_true, owner_pred, indices = reconstruct(model, val_x, kept, device, lpips=lpips)
    baseline = position_baseline(model, train_x, kept, device)

    extractor, weights = fid_extractor(cfg, classifier)
    if reference["weights_sha256"] != sha256_file(weights) or reference["num_images"] != len(val_x):
        raise ValueError("the reference features were computed with another extractor or image count; "
                         "rerun `mergevq reference-features`")
    fid_layer, isc_layer = reference["fid_layer"], reference["isc_layer"]
    layers = [fid_layer] + ([isc_layer] if isc_layer else [])
    feats = {name: extract_features(imgs, extractor=extractor, weights_path=weights, layers=layers,
                                    batch_size=fid_cfg["batch_size"])
             for name, imgs in (("gt", rec_gt), ("pred", rec_pred))}
    feats["orig"] = reference["features"]
    result = {"variant": art["variant"], "kept": kept, "tokens": model.num_tokens, "num_images": len(val_x),
              "tokenizer_sha256": sha256_file(tokenizer_path), "config_hash": config_hash(cfg),
              "tokenizer_step": art.get("step")}
    for tag in ("gt", "pred"):
        value, lo, hi = bootstrap_fid(feats["orig"][fid_layer], feats[tag][fid_layer], bootstrap, cfg["seed"])
        result[f"rfid_{tag}"] = {"value": value, "ci_low": lo, "ci_high": hi}
        for metric in ("psnr", "ssim", "lpips"):
            key = f"{metric}_{tag}"
            result[key] = float(per_image[key].mean()) if key in per_image else None
        result[f"classifier_top1_recon_{tag}"] = (
            float((feats[tag][isc_layer].argmax(-1) == val_y).float().mean()) if extractor == DEMO_EXTRACTOR else None)
    result["classifier_top1_original"] = (
        float((feats["orig"][isc_layer].argmax(-1) == val_y).float().mean()) if extractor == DEMO_EXTRACTOR else None)
    result["fid_protocol"] = {
        "extractor": extractor,
        "feature_layer": fid_layer, "weights_sha256": sha256_file(weights), "num_images": len(val_x),
        "resolution": list(val_x.shape[-2:]), "image_format": "uint8 tensors (no JPEG)",
        "reference": f"{cfg['data']['dataset']} validation originals (first {len(val_x)}, center crop)",
        "bootstrap_resamples": bootstrap, "smoke": len(val_x) < SMOKE_THRESHOLD}
    result["source_accuracy"] = float((owner_pred == owner_true).float().mean())
    result["source_accuracy_chance"] = 1.0 / kept  # a uniformly random owner per position
    result["source_accuracy_position_baseline"] = float((baseline[None] == owner_true).float().mean())
    usage = codebook_usage(indices, model.config.bits)
    result["codebook_usage"], result["codebook_perplexity"] = float(usage.usage), float(usage.perplexity)
    one = val_x[:1].float().div(127.5).sub(1).to(device)
    with torch.no_grad():
        enc = model.encode(one, kept)
        quant = model.quantizer(enc.z).quantized
    result["encoder_gmacs"] = count_macs(model.encoder, one, kept) / 1e9
    result["decoder_gmacs"] = count_macs(model.decoder, torch.zeros(1, model.num_tokens, quant.shape[-1], device=device)) / 1e9
    result["sampling_steps"] = kept  # raster AR over K tokens; the paper's Table 4 "#Step" is K/4
    result["config"] = cfg
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--tokenizer", required=True, help="stage-1 model.pt")
    parser.add_argument("--kept", type=int, required=True, help="kept token count K at inference")
    parser.add_argument("--classifier", help="demo-classifier weights (when eval.fid.extractor is demo-classifier)")
    parser.add_argument("--reference", required=True, help="features of the validation originals (reference-features)")
    parser.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the rFID interval")
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    reference = torch.load(args.reference, map_location="cpu", weights_only=False)
    result = evaluate_tokenizer(cfg, args.tokenizer, args.kept, reference, args.classifier, args.bootstrap)
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
