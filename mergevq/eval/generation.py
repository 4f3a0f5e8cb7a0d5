"""`mergevq generation-metrics`: gFID / IS of a sample folder, and the demo's checks of a generator.

* gFID and IS (Table 3): torch-fidelity through `mergevq.eval.fidelity.fid_is`. Paper config:
  Inception-v3 (inception-v3-compat) against ADM's `VIRTUAL_imagenet256_labeled.npz` statistics
  (`weights.adm_reference`). Demo: the demo classifier's features against the validation images,
  which no model trained on; fewer than 2,048 images, so smoke numbers (the protocol says so).
* Class consistency (demo): the demo classifier's top-1 on the samples against the class each was
  asked for, overall and per class: how a digits user judges a class-conditional generator.
* Memorisation: for each sample, the nearest training code sequence by Hamming distance (share of
  positions that differ), beside the same for the validation sequences (held-out images of the
  same distribution: what a generator that has not memorised should look like). A near-duplicate
  is a sequence at most as far from the training set as the closest `near_duplicate_quantile` of
  the validation sequences (a fixed threshold would mean nothing across tokenizers: on the demo
  even validation images differ from their nearest training image in about half of the 64
  positions); the shares of near-duplicates and of exact copies among samples and validation
  sequences, and the number of distinct sequences per class.
* S_hat check (RandAR, demo; `--source-check`): RandAR emits K merged codes and Source Recovery's
  S_hat places them. The same generated codes are decoded, with the same decoder, also with the
  position-only baseline's S (at each position the owner index most often seen in the training
  codes) and with the S of a random training image (one per sample, seeded), and the demo
  classifier scores all three: if S_hat carries this sample's layout, the other two score lower.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from mergevq.config import load_config
from mergevq.eval.fidelity import DEMO_EXTRACTOR, extract_features, fid_is, sha256_file
from mergevq.files import load_checkpoint, write_json

# ---------------------------------------------------------------------------------------------
# Memorisation


@torch.no_grad()
def nearest_hamming(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """queries (N, S), reference (M, S) integer codes -> (N,) share of the S positions in which
    each query differs from its nearest reference sequence (0 = an exact copy)."""
    if queries.shape[1:] != reference.shape[1:]:
        raise ValueError(f"sequences of different lengths: {tuple(queries.shape)} vs {tuple(reference.shape)}")
    out = []
    for lo in range(0, len(queries), chunk):
        q = queries[lo:lo + chunk]
        best = torch.full((len(q),), queries.shape[1], dtype=torch.long)
        for rlo in range(0, len(reference), 4096):
            diff = (q[:, None, :] != reference[None, rlo:rlo + 4096, :]).sum(-1)  # (n, m)
            best = torch.minimum(best, diff.min(1).values)
        out.append(best)
    return torch.cat(out).float() / queries.shape[1]


def distinct_per_class(codes: torch.Tensor, labels: torch.Tensor) -> dict[int, int]:
    """{class: number of distinct sequences among its rows}."""
    return {int(c): len({tuple(r) for r in codes[labels == c].tolist()}) for c in labels.unique()}


def memorisation(samples: torch.Tensor, sample_labels: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor,
                 val: torch.Tensor, quantile: float) -> dict:
    """Nearest-Hamming statistics of generated and of validation sequences against the training ones;
    the near-duplicate threshold is the `quantile` of the validation sequences' nearest distances."""
    d_samples = nearest_hamming(samples, train)
    d_val = nearest_hamming(val, train)
    near_duplicate = float(torch.quantile(d_val, quantile, interpolation="lower"))
    per_class = distinct_per_class(samples, sample_labels)
    counts = {int(c): int((sample_labels == c).sum()) for c in sample_labels.unique()}

    def stats(d: torch.Tensor) -> dict:
        return {"near_duplicate_share": float((d <= near_duplicate).float().mean()),
                "exact_copy_share": float((d == 0).float().mean()),
                "nearest_distance_mean": float(d.mean()), "nearest_distance_median": float(d.median()),
                "count": len(d)}

    return {"near_duplicate_quantile": quantile, "near_duplicate_threshold": near_duplicate,
            "sequence_length": samples.shape[1],
            "samples": stats(d_samples), "validation": stats(d_val), "train_sequences": len(train),
            "distinct_per_class": {str(c): per_class[c] for c in sorted(per_class)},
            "samples_per_class": {str(c): counts[c] for c in sorted(counts)},
            "distinct_share": sum(per_class.values()) / len(samples),
            "train_distinct_per_class": {str(c): v for c, v in sorted(distinct_per_class(train, train_labels).items())}}


def codes_for_memorisation(generator: str, manifest: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences a generator of kind `generator` models, from a codes manifest (first view)."""
    from mergevq.generator.codes import CodeDataset
    from mergevq.train.generator import sequence

    data = CodeDataset(manifest).tensors()
    return sequence(generator, data.indices[:, 0], data.owner[:, 0]), data.labels


# ---------------------------------------------------------------------------------------------
# Class consistency


@torch.no_grad()
def class_consistency(images: torch.Tensor, labels: torch.Tensor, classifier: str | Path, batch_size: int = 256) -> dict:
    """Demo-classifier top-1 of uint8 images (N, 3, H, W) against the requested labels (N,)."""
    weights = Path(classifier)
    logits = extract_features(images, extractor=DEMO_EXTRACTOR, weights_path=weights, layers=["logits_unbiased"],
                              batch_size=batch_size)["logits_unbiased"]
    correct = (logits.argmax(-1) == labels).float()
    return {"top1": float(correct.mean()),
            "per_class": {str(int(c)): float(correct[labels == c].mean()) for c in labels.unique()},
            "classifier_sha256": sha256_file(weights)}


# ---------------------------------------------------------------------------------------------
# S_hat check (RandAR)


def position_baseline_owner(train_owner: torch.Tensor, kept: int) -> torch.Tensor:
    """train_owner (N, L) -> (L,): the owner index most often seen at each position."""
    counts = torch.zeros(train_owner.shape[1], kept, dtype=torch.long)
    counts.scatter_add_(1, train_owner.T.contiguous().long(), torch.ones_like(train_owner.T, dtype=torch.long))
    return counts.argmax(1)


@torch.no_grad()
def source_check(codes: torch.Tensor, labels: torch.Tensor, meta: dict, train_codes: str | Path,
                 classifier: str | Path, seed: int = 0) -> dict:
    """Class consistency of RandAR's generated merged codes (N, K) decoded with S_hat, with the
    position-only baseline's S and with a random training image's S (same decoder throughout)."""
    from mergevq.data.datasets import to_uint8
    from mergevq.generator.codes import CodeDataset, source_from_owner
    from mergevq.tokenizer import load_tokenizer
    from mergevq.tokenizer.lfq import indices_to_codes
    from mergevq.tokenizer.recovery import FinetunedRecovery, load_recovery

    tok_path = meta["tokenizer"]
    if sha256_file(tok_path) != meta["tokenizer_sha256"]:
        raise ValueError(f"{tok_path} changed since the samples were made (sha256 differs from samples.json)")
    tokenizer, _ = load_tokenizer(tok_path)
    recovery = (load_recovery(meta["recovery"], tokenizer, meta["tokenizer_sha256"]) if meta.get("recovery")
                else FinetunedRecovery(tokenizer.recovery, tokenizer.decoder, False))
    data = CodeDataset(train_codes)
    kept = codes.shape[1]
    if data.kept != kept:
        raise ValueError(f"{train_codes} holds codes at K = {data.kept}, the samples have K = {kept}")
    train_owner = data.tensors().owner[:, 0]
    pick = torch.randint(len(train_owner), (len(codes),), generator=torch.Generator().manual_seed(seed))
    owners = {"position_baseline": position_baseline_owner(train_owner, kept).expand(len(codes), -1),
              "random_training_s": train_owner[pick]}
    bits = tokenizer.config.bits
    out = {"s_hat": None}
    for name, owner in owners.items():  # one at a time, as sampling decodes
        images = torch.cat([recovery.decode(indices_to_codes(c[None], bits), source_from_owner(o[None], kept))
                            .float().clamp(-1, 1) for c, o in zip(codes, owner)])
        out[name] = class_consistency(to_uint8(images), labels, classifier)["top1"]
    return out


# ---------------------------------------------------------------------------------------------
# Everything for one sample folder


def load_samples(folder: str | Path) -> tuple[torch.Tensor, dict, dict]:
    """(uint8 images (N, 3, H, W), codes.pt dict, samples.json dict) of a `mergevq sample` folder."""
    folder = Path(folder)
    meta_path = folder / "samples.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} missing: {folder} is not a finished `mergevq sample` folder")
    meta = json.loads(meta_path.read_text())
    with np.load(folder / "samples.npz") as data:
        images = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    codes = load_checkpoint(folder / "codes.pt")
    if len(images) != len(codes["labels"]):
        raise ValueError(f"{folder}: {len(images)} images but {len(codes['labels'])} code sequences")
    return images, codes, meta


def generation_metrics(cfg: dict, folder: str | Path, classifier: str | None = None,
                       train_codes: str | None = None, val_codes: str | None = None,
                       check_source: bool = False) -> dict:
    from mergevq.eval.tokenizer_eval import evaluation_images
    from mergevq.weights import require_weight

    images, codes, meta = load_samples(folder)
    labels = codes["labels"]
    fid_cfg = cfg["eval"]["fid"]
    result = {"samples": str(folder), "num_samples": len(images), "settings": meta["settings"],
              "generator": meta.get("generator"), "generator_name": meta.get("generator_name"),
              "generator_kind": meta.get("generator_kind"), "generator_sha256": meta.get("generator_sha256"),
              "generator_params": meta.get("generator_params"),
              "tokenizer_sha256": meta.get("tokenizer_sha256"), "cfg_sweep": meta.get("cfg_sweep"),
              "decode_tokens_per_s": meta.get("decode_tokens_per_s"), "mergear_cache": meta.get("mergear_cache")}
    if fid_cfg["extractor"] == DEMO_EXTRACTOR:
        if classifier is None:
            raise ValueError("the demo-classifier extractor needs --classifier FILE (its trained weights)")
        weights = Path(classifier)
        reference, _ = evaluation_images(cfg, "val", fid_cfg["num_images"])
        ref_desc = f"{cfg['data']['dataset']} validation images (first {len(reference)})"
    else:
        weights = require_weight(cfg, "inception")
        reference = str(require_weight(cfg, "adm_reference"))
        ref_desc = "ADM's VIRTUAL_imagenet256_labeled.npz statistics"
    scores = fid_is(images, reference, extractor=fid_cfg["extractor"], weights_path=weights,
                    batch_size=fid_cfg["batch_size"], isc=True)
    scores["protocol"]["reference"] = ref_desc
    result.update(gfid=scores["fid"], **{"is": scores["is"], "is_std": scores["is_std"]}, fid_protocol=scores["protocol"])
    result["smoke"] = scores["protocol"]["smoke"]
    if fid_cfg["extractor"] == DEMO_EXTRACTOR:
        result["class_consistency"] = class_consistency(images, labels, weights)
    if check_source:
        if meta.get("generator_kind") != "randar" or "class_consistency" not in result or not train_codes:
            raise ValueError("--source-check needs RandAR samples, the demo classifier and --train-codes")
        result["source_check"] = source_check(codes["codes"], labels, meta, train_codes, weights)
        result["source_check"]["s_hat"] = result["class_consistency"]["top1"]
    mem = cfg["generator"].get("metrics", {})
    if mem.get("memorisation") and train_codes and val_codes:
        kind = meta.get("generator_kind", "llamagen")
        train, train_labels = codes_for_memorisation(kind, train_codes)
        val, _ = codes_for_memorisation(kind, val_codes)
        result["memorisation"] = memorisation(codes["codes"], labels, train, train_labels, val,
                                              float(mem.get("near_duplicate_quantile", 0.05)))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--samples", required=True, help="a `mergevq sample` folder")
    parser.add_argument("--classifier", help="demo-classifier weights (when eval.fid.extractor is demo-classifier)")
    parser.add_argument("--train-codes", help="training codes manifest (memorisation)")
    parser.add_argument("--val-codes", help="validation codes manifest (memorisation's reference rate)")
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    parser.add_argument("--source-check", action="store_true",
                        help="RandAR: class consistency of the same codes decoded with the position-only "
                             "baseline's S and with random training images' S, beside S_hat's")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    result = generation_metrics(cfg, args.samples, args.classifier, args.train_codes, args.val_codes,
                                args.source_check)
    write_json(args.out, result)
    summary = {"cfg": result["settings"]["cfg_scale"], "gfid": result["gfid"], "is": result["is"],
               "smoke": result["smoke"]}
    if "class_consistency" in result:
        summary["class_consistency"] = result["class_consistency"]["top1"]
    if "source_check" in result:
        summary["source_check"] = result["source_check"]
    if "memorisation" in result:
        m = result["memorisation"]
        summary["near_duplicates"] = (m["samples"]["near_duplicate_share"], m["validation"]["near_duplicate_share"])
    print(summary)
    return 0
