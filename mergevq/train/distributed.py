"""torch.distributed helpers and a deterministic, resumable sharded sampler.

Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). A plain
`python` launch is a world of one and never touches torch.distributed, so every helper here is a
no-op there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks (a new tensor; the input is untouched). Identity without DDP.

    The tensor must live on the backend's device (CUDA for nccl, CPU for gloo).
    """
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if `flag` is True on any rank (e.g. a preemption signal seen by one task)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@dataclass
class DistEnv:
    """This process's place in the job, read from torchrun's environment variables."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls, use_cuda: bool | None = None) -> "DistEnv":
        """Read RANK/WORLD_SIZE/LOCAL_RANK and, for a world larger than one, init the process group:
        nccl when running on CUDA, gloo on CPU. use_cuda=None means "if CUDA is available"."""
        try:
            rank = int(os.environ.get("RANK", 0))
            world = int(os.environ.get("WORLD_SIZE", 1))
            local = int(os.environ.get("LOCAL_RANK", 0))
        except ValueError as exc:
            raise RuntimeError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from exc
        if not (0 <= rank < world):
            raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world}")
        cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
        if cuda:
            if not torch.cuda.is_available():
                raise RuntimeError("use_cuda=True but torch.cuda.is_available() is False")
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        if world > 1 and not dist.is_initialized():
            for var in ("MASTER_ADDR", "MASTER_PORT"):
                if var not in os.environ:
                    raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
            dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world)
        return cls(rank=rank, world_size=world, local_rank=local, device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_mean(tensor)

    def any_rank(self, flag: bool) -> bool:
        return any_rank(flag, self.device)

    def barrier(self) -> None:
        if is_distributed():
            dist.barrier()

    def cleanup(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Deterministic sharded sampler
# ---------------------------------------------------------------------------------------------


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The dataset order of one epoch: a pure function of (seed, epoch)."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)


class ShardedSampler(Sampler[int]):
    """Infinite, deterministic, resumable sampler for step-based DDP training.

    The global stream is the concatenation of epoch permutations perm_0, perm_1, ... (each from
    (seed, epoch)); rank r yields stream[start + r :: world_size]. When world_size divides the
    dataset size this is exactly perm_e[r::world_size] in epoch e; otherwise an epoch's last few
    positions continue into the next epoch, so every rank always yields the same number of items
    (no rank runs out first and hangs the others) and every index still appears exactly once per
    epoch across ranks.

    Iterating never changes the sampler: a DataLoader prefetches ahead of what the training loop has
    consumed, so the loop reports consumption with `advance(items_per_rank)` after each batch it
    uses, and `state_dict()` is the position of the next unconsumed item. The state is a global
    stream position, so a run may even resume under a different world size.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, position: int = 0):
        if num_samples < 1:
            raise ValueError(f"ShardedSampler needs a non-empty dataset, got {num_samples} samples")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.position = position  # global stream position of the next unconsumed item of rank 0

    def __iter__(self) -> Iterator[int]:
        g = self.position + self.rank
        epoch, perm = -1, None
        while True:
            e, i = divmod(g, self.num_samples)
            if e != epoch:
                epoch, perm = e, epoch_permutation(self.num_samples, self.seed, e, self.shuffle)
            yield int(perm[i])
            g += self.world_size

    def advance(self, items_per_rank: int) -> None:
        """Record that each rank consumed `items_per_rank` more items (e.g. one batch)."""
        self.position += items_per_rank * self.world_size

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position % self.num_samples,
                "num_samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_samples", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{getattr(self, key)!r}: the data order would not continue")
        self.position = state["epoch"] * self.num_samples + state["position"]
