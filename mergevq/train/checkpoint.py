"""Checkpoints that appear whole or not at all, refuse to be silently replaced, and resume exactly.

A checkpoint is a plain dict (model / optimiser / EMA / sampler / RNG states, step, variant,
config hash, the resolved config). It is written through a temp file and renamed, so a job killed
mid-write leaves the previous checkpoint intact. A file that still fails to load (disk full,
copied half-way) is reported as corrupt: a trainer that silently started from scratch over it
would throw away days of training.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergevq.files import CheckpointError, load_checkpoint, torch_save  # noqa: F401 (re-exported)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write `state` atomically (temp file beside `path`, then rename)."""
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    torch_save(state, path)


def check_resumable(ckpt: dict, variant: str, config_hash: str, path: str | os.PathLike | None = None) -> None:
    """Refuse to resume a checkpoint written for another variant or another resolved config."""
    where = f"checkpoint {path}" if path is not None else "checkpoint"
    for key in ("variant", "config_hash"):
        if key not in ckpt:
            raise CheckpointError(f"{where} has no {key!r} entry; it was not written by this trainer")
    if ckpt["variant"] != variant:
        raise CheckpointError(f"{where} was written for variant {ckpt['variant']!r}, this run trains {variant!r}; "
                              "refusing to resume across variants")
    if ckpt["config_hash"] != config_hash:
        raise CheckpointError(
            f"{where} was written under config hash {ckpt['config_hash']}, this run's config hashes to "
            f"{config_hash}; refusing to resume under a different config (move the checkpoint aside to start "
            "fresh, or rerun with the original config)"
        )


# ---------------------------------------------------------------------------------------------
# RNG state for exact resume
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's Python, numpy (global), torch CPU and current-CUDA-device generator states.

    Only the current CUDA device (torch.cuda.get_rng_state_all would create a context on every
    visible GPU from every DDP process). Under DDP each rank has its own state: save one per rank
    (e.g. gather them with dist.all_gather_object) for bit-exact resume of rank-dependent randomness.
    Everything is a tensor, int, float, str or tuple of ints, so the checkpoint loads with
    weights_only=True.
    """
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured (CUDA only if both the state and this process have it,
    onto the current device)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npst = state["numpy"]
    np.random.set_state({
        "bit_generator": npst["bit_generator"],
        "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
        "has_gauss": npst["has_gauss"],
        "gauss": npst["gauss"],
    })
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
