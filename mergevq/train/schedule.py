"""Learning-rate multipliers for torch.optim.lr_scheduler.LambdaLR (Table A1: step or cosine)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

KINDS = ("step", "cosine", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the base lr at optimiser step `step` (0-based).

    Linear warm-up over `warmup_steps` ((step + 1) / warmup_steps), then
      step:     gamma ** (number of milestones passed); milestones are fractions of total_steps,
      cosine:   min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * progress)) over the post-warm-up steps,
      constant: 1.
    A dataclass rather than a closure so LambdaLR's state_dict can record it.
    """

    kind: str
    total_steps: int
    warmup_steps: int = 0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"lr scheduler {self.kind!r} is not one of {KINDS}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}), "
                             "total_steps >= 1")
        for m in self.milestones:
            if not 0.0 < m < 1.0:
                raise ValueError(f"step milestone {m} is not a fraction of total_steps in (0, 1)")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            passed = sum(step >= round(m * self.total_steps) for m in self.milestones)
            return self.gamma**passed
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(kind: str, total_steps: int, warmup_steps: int = 0, milestones: Sequence[float] = (0.5, 0.75),
              gamma: float = 0.1, min_ratio: float = 0.0) -> LRSchedule:
    """The LambdaLR multiplier for config keys tokenizer.train.{scheduler, warmup_steps, step_milestones}."""
    return LRSchedule(kind, int(total_steps), int(warmup_steps), tuple(float(m) for m in milestones), gamma, min_ratio)
