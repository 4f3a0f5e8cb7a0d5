"""`mergevq sample`: class-conditional samples of a trained generator, decoded by its tokenizer.

Sample i has class i // num_per_class (ADM / LlamaGen order: 50 per class for the 50k of Table 3)
and its own random stream, seeded from (seed, i) (`sample_seeds`), so its codes do not depend on
the batch it lands in or on how many GPUs share the work. Batches of `batch_size` indices go
through the model's `generate` (KV-cache decoding, CFG on a [cond; null] batch), then the
tokenizer's decoder; each image is written as a uint8 PNG, and the batch's codes last, so a batch
is done exactly when its codes file exists: a rerun skips finished batches (resumable). Under
torchrun (or with --shard I --num-shards N for separate jobs) each worker takes every n-th
batch; the combine step (the main process after the others, or --combine-only) writes

  DIR/images/{i:06d}.png   the samples (uint8 RGB PNG)
  DIR/samples.npz          arr_0: uint8 (N, H, W, 3), for ADM's evaluator
  DIR/codes.pt             codes (N, seq) int64, labels (N,), what generated them
  DIR/samples.json         settings, provenance, decoding tokens/s (written last)

Per generator kind (`generate_kwargs`, `decode_generated`):
  llamagen  L codes in raster order, decoded per position (Eq. 14 with S the identity);
  mergear   L codes in raster order at kept = the variant's target K (M(K)), pruned KV cache;
            decoded like LlamaGen (x_l is the code at position l: no S is needed);
  randar    the K merged codes in slot order, RandAR's parallel schedule in
            generator.randar.decode_steps[variant] steps with the CFG scale ramped linearly from 1;
            decoded through Source Recovery's S_hat (--recovery: a `finetune-recovery` artefact,
            its S_hat decoder; without it the tokenizer's stage-1 recovery and decoder).

`mergevq sample --config C --generator M --tokenizer T --out DIR [--recovery R] [--num-per-class N]
 [--cfg S] [--cfg-from SWEEP.json ...] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--no-cache]`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mergevq.config import ConfigError, load_config
from mergevq.data.datasets import to_uint8
from mergevq.eval.fidelity import sha256_file
from mergevq.files import atomic_path, load_checkpoint, torch_save, write_json
from mergevq.generator.codes import decode_merged, decode_positions
from mergevq.tokenizer.lfq import indices_to_codes
from mergevq.tokenizer import load_tokenizer

SAMPLES_FORMAT = "mergevq-samples/1"


def sample_seeds(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """One int64 seed per global sample index, from numpy's SeedSequence([seed, index])."""
    return torch.tensor([int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1, np.uint64)[0] >> 1)
                         for i in indices.tolist()], dtype=torch.int64)


def sample_labels(num_classes: int, num_per_class: int) -> torch.Tensor:
    """Class of every sample index: (C * n,) = [0]*n + [1]*n + ..."""
    return torch.arange(num_classes).repeat_interleave(num_per_class)


def load_generator_artifact(path: str | Path, map_location="cpu"):
    """(generator in eval mode, artefact dict); EMA weights when the run kept them."""
    from mergevq.generator import generator_from_config

    art = load_checkpoint(path, map_location=map_location, weights_only=False)
    if "generator_config" not in art:
        raise ValueError(f"{path} is not a generator artefact (made by `mergevq train-generator`)")
    model = generator_from_config(art["generator_config"])
    model.load_state_dict(art["ema"] if "ema" in art else art["model"])
    return model.eval(), art


def decode_generated(kind: str, tokenizer, codes: torch.Tensor, recovery=None) -> torch.Tensor:
    """Generated codes (B, N) -> images (B, 3, H, W) in [-1, 1], one sample at a time.

    llamagen / mergear: N = L codes in raster order, decoded per position. randar: N = K merged
    codes in slot (canonical) order: S_hat from `recovery` (a FinetunedRecovery: its recovery and
    the decoder it feeds) or, when None, the tokenizer's own Source Recovery (Eq. 9-10, 14-15).
    One at a time because convolution kernels pick their blocking by batch size, and the float
    differences that makes (~1e-6) flip a few uint8 pixels: an image must not depend on its batch."""
    if kind in ("llamagen", "mergear"):  # raster order over the L grid positions
        return torch.cat([decode_positions(tokenizer, c[None]) for c in codes])
    if kind == "randar":
        if recovery is None:
            return torch.cat([decode_merged(tokenizer, c[None]) for c in codes])
        bits = tokenizer.config.bits
        return torch.cat([recovery.decode(indices_to_codes(c[None], bits)).float().clamp(-1, 1) for c in codes])
    raise ValueError(f"no decoding for generator kind {kind!r}")


def generate_kwargs(cfg: dict, kind: str, variant: str) -> dict:
    """The kind-specific arguments of `generate` that sampling uses (recorded in samples.json)."""
    from mergevq.train.generator import inference_kept

    if kind == "mergear":
        return {"kept": inference_kept(cfg, kind, variant)}
    if kind == "randar":
        steps = (cfg["generator"].get("randar", {}).get("decode_steps") or {}).get(variant)
        if steps is None:
            raise ConfigError(f"generator.randar.decode_steps.{variant}: missing (RandAR's parallel decoding "
                              "steps T, Table 3: 64 for N = 144, 88 for N = 256)")
        return {"steps": int(steps), "cfg_schedule": "linear"}
    return {}


def select_cfg(sweep_jsons) -> tuple[float, list[dict]]:
    """The CFG scale with the lowest gFID among generation-metrics files (ties: the smaller scale)."""
    rows = []
    for path in sweep_jsons:
        rec = json.loads(Path(path).read_text())
        if "gfid" not in rec or "settings" not in rec:
            raise ValueError(f"{path}: not a generation-metrics file (no gfid / settings)")
        rows.append({"cfg_scale": float(rec["settings"]["cfg_scale"]), "gfid": rec["gfid"], "is": rec.get("is"),
                     "class_consistency": rec.get("class_consistency"), "path": str(path)})
    if not rows:
        raise ValueError("--cfg-from: no sweep metrics files given")
    best = min(rows, key=lambda r: (r["gfid"], r["cfg_scale"]))
    return best["cfg_scale"], sorted(rows, key=lambda r: r["cfg_scale"])


# ---------------------------------------------------------------------------------------------
# Sampling


def _batch_file(out: Path, b: int) -> Path:
    return out / "parts" / f"codes-{b:05d}.pt"


def _save_png(image: torch.Tensor, path: Path) -> None:
    """uint8 (3, H, W) -> PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="png")


@torch.no_grad()
def generate_samples(model, tokenizer, labels: torch.Tensor, out: Path, settings: dict, worker: int = 0,
                     workers: int = 1, device=None, progress: bool = True, recovery=None) -> dict:
    """Generate and save every batch of this worker that is not done yet; returns timing."""
    device = device or torch.device("cpu")
    kind = model.config.kind
    bs = int(settings["batch_size"])
    batches = [b for b in range(-(-len(labels) // bs)) if b % workers == worker]
    todo = [b for b in batches if not _batch_file(out, b).exists()]
    gen_time, tokens = 0.0, 0
    cache = {"rows": 0, "rows_over_k": 0, "growths": 0, "cache_len_sum": 0.0, "kept_sum": 0.0}
    for b in tqdm(todo, desc=f"sample cfg={settings['cfg_scale']}", file=sys.stderr, disable=not progress):
        idx = torch.arange(b * bs, min(len(labels), (b + 1) * bs))
        y = labels[idx].to(device)
        t0 = time.perf_counter()
        decode = model.generate_with_stats if kind == "mergear" else model.generate
        codes = decode(y, cfg_scale=settings["cfg_scale"], temperature=settings["temperature"],
                       top_k=settings["top_k"], top_p=settings["top_p"],
                       seeds=sample_seeds(settings["seed"], idx), use_cache=settings["use_cache"],
                       **settings.get("generate", {}))
        if kind == "mergear":  # what the pruned cache did (MergeARStats)
            st = codes.stats
            codes = codes.codes
            cache["rows"] += len(idx)
            cache["rows_over_k"] += st.rows_over_k
            cache["growths"] += st.growths
            cache["cache_len_sum"] += float(st.cache_len.float().mean(1).sum())
            cache["kept_sum"] += float(st.kept.float().sum())
        if device.type == "cuda":
            torch.cuda.synchronize()
        gen_time += time.perf_counter() - t0
        tokens += codes.numel()
        images = to_uint8(decode_generated(kind, tokenizer, codes, recovery)).cpu()
        for i, image in zip(idx.tolist(), images):
            _save_png(image, out / "images" / f"{i:06d}.png")
        torch_save({"indices": idx, "codes": codes.cpu(), "labels": y.cpu()}, _batch_file(out, b))
    timing = {"batches": len(todo), "generate_seconds": gen_time, "tokens": tokens}
    if cache["rows"]:
        timing["mergear_cache"] = {"samples": cache["rows"], "samples_over_k": cache["rows_over_k"],
                                   "batches_grown": cache["growths"], "kept_mean": cache["kept_sum"] / cache["rows"],
                                   "mean_cache_entries": cache["cache_len_sum"] / cache["rows"],
                                   "sequence_length": model.config.num_tokens}
    return timing


def combine(out: Path, meta: dict, num: int) -> dict:
    """Gather every batch's codes and PNG into codes.pt and samples.npz; then samples.json."""
    from PIL import Image

    bs = int(meta["settings"]["batch_size"])
    parts = []
    for b in range(-(-num // bs)):
        path = _batch_file(out, b)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: sample every shard before combining")
        parts.append(load_checkpoint(path))
    indices = torch.cat([p["indices"] for p in parts])
    if not torch.equal(indices, torch.arange(num)):
        raise ValueError(f"{out}/parts: the batches do not cover indices 0..{num - 1} exactly once")
    images = np.stack([np.asarray(Image.open(out / "images" / f"{i:06d}.png").convert("RGB")) for i in range(num)])
    with atomic_path(out / "samples.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, arr_0=images)  # ADM's evaluator reads arr_0: uint8 NHWC
    torch_save({"codes": torch.cat([p["codes"] for p in parts]), "labels": torch.cat([p["labels"] for p in parts]),
                "settings": meta["settings"]}, out / "codes.pt")
    meta = {**meta, "num_samples": num, "image_shape": list(images.shape[1:])}
    write_json(out / "samples.json", meta)
    return meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--generator", required=True, help="trained generator model.pt")
    parser.add_argument("--tokenizer", required=True, help="the stage-1 model.pt whose codes the generator learned")
    parser.add_argument("--recovery", default=None,
                        help="RandAR: the fine-tuned Source Recovery (recovery/model.pt) whose S_hat places the codes")
    parser.add_argument("--out", required=True, help="sample folder (images/, samples.npz, codes.pt, samples.json)")
    parser.add_argument("--num-per-class", type=int, default=None,
                        help="samples per class (default generator.sampling.num_per_class)")
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--cfg-from", nargs="*", default=None, metavar="JSON",
                        help="generation-metrics files of a CFG sweep: use the scale with the lowest gFID")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="base of the per-index seeds")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per batch (results do not depend on it)")
    parser.add_argument("--no-cache", action="store_true", help="decode without the KV cache (timing reference)")
    parser.add_argument("--shard", type=int, default=0, help="this job's shard (with --num-shards)")
    parser.add_argument("--num-shards", type=int, default=1, help="separate jobs sharing the batches; combine after")
    parser.add_argument("--combine-only", action="store_true", help="only gather finished shards into the outputs")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    from mergevq.train.distributed import DistEnv

    cfg = load_config(args.config, args.set)
    sc = cfg.get("generator", {}).get("sampling")
    if sc is None:
        raise ConfigError("generator.sampling: missing (cfg_scales, sweep_per_class, num_per_class, temperature, ...)")
    pick = lambda arg, key: sc.get(key) if arg is None else arg  # noqa: E731
    sweep = None
    if args.cfg_from:
        if args.cfg is not None:
            raise ValueError("give --cfg or --cfg-from, not both")
        cfg_scale, sweep = select_cfg(args.cfg_from)
    elif args.cfg is not None:
        cfg_scale = args.cfg
    else:
        raise ValueError("give the guidance scale: --cfg S, or --cfg-from SWEEP_METRICS.json ...")
    settings = {"cfg_scale": float(cfg_scale), "temperature": float(pick(args.temperature, "temperature")),
                "top_k": pick(args.top_k, "top_k"), "top_p": pick(args.top_p, "top_p"),
                "seed": int(pick(args.seed, "seed") or 0), "batch_size": int(pick(args.batch_size, "batch_size")),
                "num_per_class": int(pick(args.num_per_class, "num_per_class")), "use_cache": not args.no_cache}
    if not 0 <= args.shard < args.num_shards:
        raise ValueError(f"--shard {args.shard} outside [0, --num-shards {args.num_shards})")
    out = Path(args.out)
    dist = DistEnv.from_env()
    model, art = load_generator_artifact(args.generator)
    tokenizer, _ = load_tokenizer(args.tokenizer)
    tok_sha = sha256_file(args.tokenizer)
    if art.get("codes", {}).get("tokenizer_sha256") not in (None, tok_sha):
        raise ValueError(f"{args.generator} was trained on codes of tokenizer sha256 "
                         f"{art['codes']['tokenizer_sha256'][:16]}..., but {args.tokenizer} is {tok_sha[:16]}...")
    model, tokenizer = model.to(dist.device), tokenizer.to(dist.device)
    kind = model.config.kind
    extra = generate_kwargs(cfg, kind, art.get("codes", {}).get("variant"))
    if extra:
        settings["generate"] = extra
    recovery = None
    if args.recovery is not None:
        if kind != "randar":
            raise ValueError(f"--recovery places merged codes; {args.generator} is a {kind} generator of all L positions")
        from mergevq.tokenizer.recovery import load_recovery

        recovery = load_recovery(args.recovery, tokenizer, tok_sha).to(dist.device)
        settings["recovery_sha256"] = sha256_file(args.recovery)
    num_classes = model.config.num_classes
    labels = sample_labels(num_classes, settings["num_per_class"])
    meta = {"format": SAMPLES_FORMAT, "settings": settings, "generator": str(args.generator),
            "generator_sha256": sha256_file(args.generator), "generator_kind": model.config.kind,
            "generator_name": art.get("name"), "generator_params": sum(p.numel() for p in model.parameters()),
            "tokenizer": str(args.tokenizer), "tokenizer_sha256": tok_sha, "recovery": args.recovery,
            "num_classes": num_classes, "cfg_sweep": sweep}
    # a folder holds one setting: refuse to mix batches of another run into it
    stamp = out / "parts" / "settings.json"
    if stamp.exists():
        old = json.loads(stamp.read_text())
        if old != {k: meta[k] for k in ("settings", "generator_sha256", "tokenizer_sha256")}:
            raise ValueError(f"{out} holds samples of other settings ({stamp}); use another folder or delete it")
    elif dist.is_main:
        write_json(stamp, {k: meta[k] for k in ("settings", "generator_sha256", "tokenizer_sha256")})
    dist.barrier()
    workers = args.num_shards * dist.world_size
    worker = args.shard * dist.world_size + dist.rank
    try:
        if not args.combine_only:
            timing = generate_samples(model, tokenizer, labels, out, settings, worker, workers, dist.device,
                                      progress=dist.is_main, recovery=recovery)
            if timing["generate_seconds"] > 0:
                meta["decode_tokens_per_s"] = timing["tokens"] / timing["generate_seconds"]
                meta["decode_tokens_per_s_note"] = (
                    f"{'with' if settings['use_cache'] else 'without'} KV cache, worker {worker} of {workers}, "
                    f"{dist.device.type}, this run's {timing['batches']} batches (CFG rows counted once)")
            if "mergear_cache" in timing:  # MergeAR: distinct codes kept, cache entries, how often it grew
                meta["mergear_cache"] = timing["mergear_cache"]
        dist.barrier()
        if dist.is_main and (args.num_shards == 1 or args.combine_only):
            meta = combine(out, meta, len(labels))
            print(f"{meta['num_samples']} samples at cfg {settings['cfg_scale']} -> {out}")
    finally:
        dist.cleanup()
    return 0
