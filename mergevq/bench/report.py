"""What a benchmark item returns, its goals, and the table `mergevq bench` prints."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

OPS = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t}


@dataclass(frozen=True)
class Goal:
    """A figure and the goal it is held to: `value op target` (e.g. 412.0 >= 200.0)."""

    key: str  # the JSON key, with [variant] where one key holds several figures
    value: float
    op: str  # ">=" or "<="
    target: float
    what: str  # one line: what the figure is

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"goal {self.key}: op must be one of {sorted(OPS)}, got {self.op!r}")

    @property
    def met(self) -> bool:
        return math.isfinite(self.value) and OPS[self.op](self.value, self.target)

    def as_dict(self) -> dict:
        return {"value": self.value, "goal": f"{self.op} {self.target:.6g}", "met": self.met, "what": self.what}


@dataclass
class ItemResult:
    keys: dict[str, Any]  # the JSON's headline keys of this item
    details: dict[str, Any]  # everything else measured (sizes, medians, spreads, memory, ...)
    goals: list[Goal] = field(default_factory=list)
    profile: Any = None  # torch.profiler top kernels, attached when a goal is missed


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def goals_table(results: dict[str, ItemResult]) -> str:
    """Markdown: one row per goal (item, figure, ours, goal, met)."""
    lines = ["| item | figure | ours | goal | met |", "|---|---|---|---|---|"]
    for item, res in results.items():
        for g in res.goals:
            lines.append(f"| {item} | `{g.key}` | {fmt(g.value)} | {g.op} {fmt(g.target)} | "
                         f"{'yes' if g.met else '**no**'} |")
    return "\n".join(lines)


def profile_table(profile: list[dict]) -> str:
    lines = ["| op | self ms | share | calls |", "|---|---|---|---|"]
    lines += [f"| `{p['op']}` | {p['self_ms']:.1f} | {p['share']:.0%} | {p['calls']} |" for p in profile]
    return "\n".join(lines)
