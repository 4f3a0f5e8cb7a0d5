"""The one training loop every stage shares (tokenizer, Source-Recovery fine-tuning, generators).

A stage is an object with the `Stage` interface below: it owns its models, optimisers and losses
and knows how to take one optimisation step; the loop owns everything around it: the step counter,
the deterministic sharded data order, checkpoint / exact resume, preemption signals, the NaN guard,
metrics CSV, tqdm progress, validation cadence, and the final artefact.

Files in the output directory:
  last.ckpt    resumable state (undeclared in Snakemake: it must survive a failed job)
  model.pt     the artefact later stages load; written once, when training completes
  metrics.csv  one row per logging step;  val.csv  one row per validation
  run.json     seed, git commit, package versions, config hash
"""
from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mergevq.files import atomic_path, torch_save, write_json
from mergevq.train.checkpoint import check_resumable, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mergevq.train.distributed import DistEnv, ShardedSampler
from mergevq.train.runinfo import run_info
from mergevq.train.signals import PreemptionHandler, requeue_slurm_job


class TrainingDiverged(RuntimeError):
    """A loss became NaN/Inf; the last good checkpoint is kept."""


class Stage(Protocol):
    name: str  # e.g. the tokenizer variant; checked on resume

    def train_step(self, batch: Any, step: int) -> dict[str, float]:
        """One optimisation step on `batch`; returns scalar metrics including 'loss'."""

    def validate(self, step: int, out_dir: Path) -> dict[str, float]:
        """Metrics on held-out data (main process only; may write images to out_dir)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def artifact(self) -> dict:
        """What model.pt holds (weights, EMA weights, whatever later stages need)."""


@dataclass
class LoopConfig:
    total_steps: int  # the schedule's length, from the config
    batch_size: int  # global batch; each rank takes batch_size // world_size
    seed: int
    log_every: int
    val_every: int
    ckpt_every: int
    max_steps: int | None = None  # stop early (a later, larger value continues)
    num_workers: int = 0


def _append_csv(path: Path, row: dict) -> None:
    """Append a row; when it brings new columns (e.g. GAN terms from `gan_start`), rewrite the file
    with the union header so every row stays aligned."""
    rows, fields = [], []
    if path.exists():
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or [])
            if set(row) <= set(fields):
                with open(path, "a", newline="") as out:
                    csv.DictWriter(out, fieldnames=fields).writerow(row)
                return
            rows = list(reader)
    fields += [k for k in row if k not in fields]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows + [row])


def _truncate_csv(path: Path, last_step: int) -> None:
    """Drop rows logged after the checkpoint being resumed (they will be logged again)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) <= last_step)


def fit(stage: Stage, dataset: Dataset, loop: LoopConfig, out_dir: str | Path, cfg: dict, cfg_hash: str,
        dist: DistEnv | None = None, collate_fn=None) -> int:
    """Train `stage` until `loop.total_steps` (or `loop.max_steps`); returns the process exit code.

    Resumes from out_dir/last.ckpt when it exists (refusing one of another stage or config);
    SIGTERM/SIGUSR1 checkpoint and exit 128+signum so a requeued job resumes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = dist or DistEnv.from_env()
    ckpt_path, model_path = out_dir / "last.ckpt", out_dir / "model.pt"
    if loop.batch_size % dist.world_size:
        raise ValueError(f"global batch {loop.batch_size} is not divisible by world size {dist.world_size}")
    per_rank = loop.batch_size // dist.world_size
    sampler = ShardedSampler(len(dataset), dist.rank, dist.world_size, seed=loop.seed)

    step = 0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, weights_only=False)
        check_resumable(ckpt, stage.name, cfg_hash, ckpt_path)
        stage.load_state_dict(ckpt["stage"])
        sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"][dist.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        step = int(ckpt["step"])
        if dist.is_main:
            _truncate_csv(out_dir / "metrics.csv", step)
            _truncate_csv(out_dir / "val.csv", step)
            print(f"[{stage.name}] resumed from {ckpt_path} at step {step}", file=sys.stderr)
        del ckpt
    elif model_path.exists():
        raise FileExistsError(
            f"{model_path} exists but {ckpt_path} does not: this run already finished; "
            "refusing to overwrite it (delete the directory to retrain)"
        )
    else:
        torch.manual_seed(loop.seed + dist.rank)
        if dist.is_main:  # rows of an attempt that died before its first checkpoint: this run starts over
            for name in ("metrics.csv", "val.csv"):
                (out_dir / name).unlink(missing_ok=True)

    if dist.is_main:
        write_json(out_dir / "run.json", run_info(cfg, loop.seed) | {"stage": stage.name, "world_size": dist.world_size})

    def save(at_step: int) -> None:
        state = {"stage": stage.state_dict(), "sampler": sampler.state_dict(), "step": at_step,
                 "variant": stage.name, "config_hash": cfg_hash, "config": cfg}
        rngs = [rng_state()]
        if dist.distributed:
            rngs = [None] * dist.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        state["rng"] = rngs
        if dist.is_main:
            save_checkpoint(state, ckpt_path)
        dist.barrier()

    stop_at = loop.total_steps if loop.max_steps is None else min(loop.total_steps, loop.max_steps)
    # The loader gets its own generator: creating an iterator draws a base seed from it, and drawing
    # that from the global RNG would make a resumed run's randomness differ from an uninterrupted one.
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=loop.num_workers,
                        drop_last=True, collate_fn=collate_fn, persistent_workers=False,
                        generator=torch.Generator().manual_seed(loop.seed + dist.rank))
    batches = iter(loader)
    bar = tqdm(total=stop_at, initial=step, desc=f"train {stage.name}", disable=not dist.is_main,
               dynamic_ncols=True, file=sys.stderr, mininterval=2.0)
    exit_code = 0
    t_last, images_since = time.perf_counter(), 0
    with PreemptionHandler() as preempt:
        while step < stop_at:
            batch = next(batches)
            sampler.advance(per_rank)
            metrics = stage.train_step(batch, step)
            loss = metrics["loss"]
            if not math.isfinite(loss):
                terms = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                kept = (f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists()
                        else f"no checkpoint was written yet (ckpt_every {loop.ckpt_every})")
                raise TrainingDiverged(f"[{stage.name}] non-finite loss at step {step} ({terms}); {kept}")
            step += 1
            images_since += loop.batch_size
            bar.update(1)
            if step % loop.log_every == 0 or step == stop_at:
                now = time.perf_counter()
                throughput = images_since / max(now - t_last, 1e-9)
                t_last, images_since = now, 0
                row = {"step": step, **{k: float(v) for k, v in metrics.items()}, "images_per_s": throughput}
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{throughput:.0f}", refresh=False)
                if dist.is_main:
                    _append_csv(out_dir / "metrics.csv", row)
                    if hasattr(stage, "warnings"):
                        for w in stage.warnings(metrics):
                            print(f"[{stage.name}] WARNING step {step}: {w}", file=sys.stderr)
            if step % loop.val_every == 0 or step == loop.total_steps:
                if dist.is_main:
                    val = stage.validate(step, out_dir)
                    _append_csv(out_dir / "val.csv", {"step": step, **val})
                    print(f"[{stage.name}] step {step} val: " + ", ".join(f"{k}={v:.4g}" for k, v in val.items()),
                          file=sys.stderr)
                dist.barrier()
            if step % loop.ckpt_every == 0:
                save(step)
            if dist.any_rank(preempt.requested):
                save(step)
                exit_code = preempt.exit_code or 143
                print(f"[{stage.name}] preempted at step {step}: checkpoint written, exiting {exit_code}",
                      file=sys.stderr)
                if dist.is_main:
                    print(f"[{stage.name}] {requeue_slurm_job()[1]}", file=sys.stderr)
                break
        bar.close()
        if exit_code:
            return exit_code
        # Still under the handler: a signal arriving now (SLURM's time-limit warning, say) must not kill
        # the final checkpoint or artefact write of a finished training; it is noted and ignored.
        save(step)
        if step >= loop.total_steps and dist.is_main:
            torch_save({**stage.artifact(), "config": cfg, "config_hash": cfg_hash, "step": step,
                        "run": run_info(cfg, loop.seed)}, model_path)
            print(f"[{stage.name}] training complete: {model_path}", file=sys.stderr)
        dist.barrier()
    return 0
