"""`mergevq extract-codes`: a frozen tokenizer's codes of every image of a split, for stage 2.

Per image: the K code indices in canonical order (as the encoder emits them), the owner of each of
the L positions (`source.argmax(1)`; the first occurrences must appear in the order 0..K-1, so the
owner vector alone determines S and the order; `mergevq.generator.codes.check_owner`) and the
label. With `generator.codes.flip` the mirrored training image is encoded too (LlamaGen's flip
augmentation; off for digits, where a mirrored digit is another shape); the generator stage picks
one of the two per sample and step. The tokenizer's EMA weights are used, as for evaluation.

Output: DIR/{split}-{i:05d}.pt shards of `generator.codes.shard_size` images, each written
atomically and skipped on a rerun if it already holds what this run would write (so an
interrupted extraction resumes), then DIR/{split}.json (the manifest: shards, K, L, bits, the
tokenizer's sha256). Under torchrun each rank encodes every world_size-th shard.

Codes are extracted once per (variant, K), not encoded on the fly by a frozen tokenizer in the
generator's data loader, also for MergeAR's per-image K (one extract_codes job per K of the
stage-2 merge-ratio sampler's support; the loader picks among them). Measured with
torch.utils.flop_counter (MACs per 256-px image): the encoder costs 47-50 GMACs (G+R, K in
144..256) and 102-128 GMACs (G, K in 256..1024), against ~95 (G+R, 256 tokens) and ~400 (G, 1024)
GMACs of LlamaGen-L's forward alone (~3x that per training step): on the fly adds ~17% (G+R) /
~10% (G) to every one of 300 epochs and needs the JPEG pipeline at the generator's rate, while
extracting once costs the encoder 5 (G+R) / 17 (G) passes per image and view, 30x / 9x less.
Storage: 4 K + 2 L bytes per image and view (int32 indices, int16 owner): G+R at K = 144..256
(5 values) with flips 16.7 GB for ImageNet's 1.28M images; G at K = 256..1024 (17 values) with
flips 194 GB, which a cluster holds; the demo's 1,437 digits at K = L = 64: 563 KB.

`mergevq extract-codes --config C --tokenizer M --kept K --split train|val --out DIR`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from mergevq.config import ConfigError, config_hash, load_config
from mergevq.eval.fidelity import sha256_file
from mergevq.files import load_checkpoint, torch_save, write_json
from mergevq.generator.codes import (SHARD_FORMAT, CodeShard, check_owner, manifest_path, owner_from_source,
                                     pack_shard, shard_name)
from mergevq.tokenizer import load_tokenizer
from mergevq.train.distributed import DistEnv


def codes_settings(cfg: dict) -> dict:
    """The config parts extracted codes depend on (besides the tokenizer file and K)."""
    settings = cfg.get("generator", {}).get("codes")
    if settings is None:
        raise ConfigError("generator.codes: missing (flip, shard_size, batch_size of `mergevq extract-codes`)")
    return {"data": cfg["data"], "seed": cfg["seed"], "codes": settings}


@torch.no_grad()
def encode_batch(model, images: torch.Tensor, kept: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, H, W) in [-1, 1] -> indices (B, A, K), owner (B, A, L); A = 2 with the mirror."""
    views = [images, images.flip(-1)] if flip else [images]
    indices, owners = [], []
    for x in views:
        enc = model.encode(x, kept)
        owner = owner_from_source(enc.source)  # checks partition and canonical order
        indices.append(model.quantizer(enc.z).indices)
        owners.append(owner)
    return torch.stack(indices, 1), torch.stack(owners, 1)


def _shard_is_done(path: Path, meta: dict) -> bool:
    if not path.is_file():
        return False
    try:
        state = load_checkpoint(path)
    except Exception:  # a damaged shard is simply recomputed
        return False
    return state.get("format") == SHARD_FORMAT and state.get("meta") == meta


def extract_codes(cfg: dict, tokenizer_path: str | Path, kept: int, split: str, out_dir: str | Path,
                  dist: DistEnv | None = None, batch_size: int | None = None) -> dict | None:
    """Encode `split` at kept count `kept`; returns the manifest (on the main process)."""
    from mergevq.data import build_dataset

    dist = dist or DistEnv()
    out_dir = Path(out_dir)
    settings = codes_settings(cfg)["codes"]
    model, art = load_tokenizer(tokenizer_path)
    model = model.to(dist.device)
    L = model.num_tokens
    if not 1 <= kept <= L:
        raise ValueError(f"--kept {kept} outside [1, {L}] for tokenizer {tokenizer_path}")
    flip = bool(settings["flip"]) and split == "train"
    dataset = build_dataset(cfg, split, transform="eval")  # center crop; flips are explicit here
    shard_size = int(settings["shard_size"])
    num_shards = max(1, -(-len(dataset) // shard_size))
    tok_sha = sha256_file(tokenizer_path)
    base_meta = {"tokenizer_sha256": tok_sha, "kept": kept, "split": split, "flip": flip,
                 "settings": config_hash(codes_settings(cfg)), "shard_size": shard_size}
    batch_size = batch_size or int(settings["batch_size"])
    t0, encoded = time.perf_counter(), 0
    entries = []
    for i in range(num_shards):
        lo, hi = i * shard_size, min(len(dataset), (i + 1) * shard_size)
        path = out_dir / shard_name(split, i)
        meta = {**base_meta, "first": lo, "count": hi - lo}
        entries.append({"file": path.name, "first": lo, "count": hi - lo})
        if i % dist.world_size != dist.rank or _shard_is_done(path, meta):
            continue
        loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, shuffle=False,
                            num_workers=cfg["data"].get("num_workers", 0))
        parts = []
        for images, labels in tqdm(loader, desc=f"extract {split} K={kept} shard {i + 1}/{num_shards}",
                                   file=sys.stderr, mininterval=2.0, disable=not dist.is_main):
            idx, owner = encode_batch(model, images.to(dist.device), kept, flip)
            parts.append((idx.cpu(), owner.cpu(), torch.as_tensor(labels).long()))
        shard = CodeShard(*(torch.cat(p) for p in zip(*parts)))
        check_owner(shard.owner.flatten(0, 1).long(), kept)
        torch_save(pack_shard(shard, meta), path)
        encoded += hi - lo
    dist.barrier()
    elapsed = time.perf_counter() - t0
    if not dist.is_main:
        return None
    manifest = {"format": SHARD_FORMAT, "split": split, "kept": kept, "tokens": L, "grid": model.grid,
                "bits": model.config.bits, "num_images": len(dataset), "augmentations": 2 if flip else 1,
                "flip": flip, "num_classes": cfg["data"]["num_classes"], "variant": art.get("variant"),
                "tokenizer": {"path": str(tokenizer_path), "sha256": tok_sha, "step": art.get("step"),
                              "config_hash": art.get("config_hash")},
                "settings_hash": base_meta["settings"], "shards": entries,
                "bytes_per_image": 4 * kept * (2 if flip else 1) + 2 * L * (2 if flip else 1) + 8,
                "encode_seconds": elapsed, "encoded_images_this_run": encoded}
    write_json(manifest_path(out_dir, split), manifest)
    return manifest


# -- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--tokenizer", required=True, help="stage-1 model.pt")
    parser.add_argument("--kept", type=int, required=True, help="kept token count K")
    parser.add_argument("--split", required=True, choices=["train", "val"])
    parser.add_argument("--out", required=True, help="directory for {split}-*.pt shards and {split}.json")
    parser.add_argument("--batch-size", type=int, default=None, help="encoding batch (default generator.codes.batch_size)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    dist = DistEnv.from_env()
    try:
        manifest = extract_codes(cfg, args.tokenizer, args.kept, args.split, args.out, dist, args.batch_size)
    finally:
        dist.cleanup()
    if manifest is not None:
        print(f"{manifest['num_images']} images x {manifest['augmentations']} at K={manifest['kept']} "
              f"(L={manifest['tokens']}) in {manifest['encode_seconds']:.1f} s -> {manifest_path(args.out, args.split)}")
    return 0
