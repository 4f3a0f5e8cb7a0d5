"""Timing pieces of `mergevq bench`: alternating timed pairs, medians with their spread, the
machine's matmul rate, and torch.profiler's top kernels for a figure that misses its goal.

Two ways of doing the same work are timed in one process, alternating after a warm-up (round i
runs A then B for even i, B then A for odd i, so a slow drift of the machine's speed, e.g. another
process starting, falls on both sides alike). Each side reports its median and the range of its
samples; a ratio reports the ratio of the medians and the range of the per-round ratios.
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Callable, NamedTuple

import torch
import torch.nn as nn


class Timing(NamedTuple):
    """Seconds of one side: median and spread (min, max) of its samples."""

    median: float
    low: float
    high: float
    samples: tuple[float, ...]

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.low, "max_s": self.high,
                "samples_s": list(self.samples)}


class Ratio(NamedTuple):
    """numerator / denominator: ratio of the medians and the range of the per-round ratios."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"value": self.value, "min": self.low, "max": self.high}


def summarize(samples) -> Timing:
    """Median and (min, max) of a non-empty sequence of seconds."""
    samples = tuple(float(s) for s in samples)
    if not samples:
        raise ValueError("summarize needs at least one sample")
    return Timing(statistics.median(samples), min(samples), max(samples), samples)


def ratio(numerator: Timing, denominator: Timing) -> Ratio:
    """numerator / denominator of two sides timed in the same rounds (equal sample counts)."""
    if len(numerator.samples) != len(denominator.samples):
        raise ValueError(f"ratio of timings with {len(numerator.samples)} and "
                         f"{len(denominator.samples)} samples: they were not timed in pairs")
    per_round = [n / d for n, d in zip(numerator.samples, denominator.samples)]
    return Ratio(numerator.median / denominator.median, min(per_round), max(per_round))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one fn() call, with the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(sides: dict[str, Callable[[], object]], repeats, device: torch.device,
              warmup: int = 1) -> dict[str, Timing]:
    """Time each side in alternating rounds after `warmup` untimed calls of each.

    sides: name -> zero-argument callable (the whole measured work, e.g. forward + backward).
    repeats: an int, or a `Repeats` (at least `min` rounds, more while the estimated time of all
    rounds stays within `budget_s`, at most `max`; the estimate is the last warm-up round, or the
    first timed round without warm-up). Round i runs the sides in order for even i, reversed for odd i.
    """
    lo, hi, budget = ((repeats, repeats, None) if isinstance(repeats, int)
                      else (repeats.min, repeats.max, repeats.budget_s))
    if lo < 1 or hi < lo or warmup < 0:
        raise ValueError(f"alternate needs 1 <= repeats (min {lo}) <= max {hi} and warmup >= 0, got warmup {warmup}")
    names = list(sides)
    round_s = None
    for _ in range(warmup):
        round_s = sum(time_call(sides[name], device) for name in names)
    samples: dict[str, list[float]] = {name: [] for name in names}
    target = lo
    i = 0
    while i < target:
        for name in (names if i % 2 == 0 else names[::-1]):
            samples[name].append(time_call(sides[name], device))
        if i == 0 and budget is not None:
            round_s = round_s if round_s is not None else sum(s[0] for s in samples.values())
            target = max(lo, min(hi, int(budget / max(round_s, 1e-9))))
        i += 1
    return {name: summarize(s) for name, s in samples.items()}


def lockstep(sides: dict[str, Callable[[], object]], step_module: nn.Module,
             device: torch.device) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Run long step-by-step computations side by side, alternating at every step.

    Each side runs in its own thread, but only one runs at a time: whenever a side enters
    `step_module` (a forward pre-hook, e.g. the first transformer block, which a decode calls once
    per step) it records the time since it last resumed and hands the turn to the next side. So
    side A's step t, then B's step t, then A's step t + 1, ...: a drift of the machine's speed
    falls on both sides alike, step by step, and one run of each side yields paired per-step
    times. Returns ({side: seconds of each segment between its hook calls (plus the segments
    before the first and after the last)}, {side: its return value}).
    """
    names = list(sides)
    cond = threading.Condition()
    turn, done = [0], set()
    segments: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, object] = {}
    errors: list[BaseException] = []
    owner: dict[int, str] = {}
    resumed: dict[str, float] = {}

    def hand_over(i: int) -> None:  # with cond held: the next side still running gets the turn
        for k in range(1, len(names) + 1):
            j = (i + k) % len(names)
            if names[j] not in done or j == i:
                turn[0] = j
                break
        cond.notify_all()

    def wait_for_turn(i: int) -> None:  # with cond held
        cond.wait_for(lambda: turn[0] == i or errors)

    def close_segment(name: str) -> None:
        synchronize(device)
        segments[name].append(time.perf_counter() - resumed[name])

    def hook(module, args):
        name = owner.get(threading.get_ident())
        if name is None:  # a call from another thread (e.g. a warm-up): not timed
            return
        close_segment(name)
        i = names.index(name)
        with cond:
            hand_over(i)
            wait_for_turn(i)
        resumed[name] = time.perf_counter()

    def worker(name: str) -> None:
        i = names.index(name)
        owner[threading.get_ident()] = name
        try:
            with cond:
                wait_for_turn(i)
            resumed[name] = time.perf_counter()
            results[name] = sides[name]()
            close_segment(name)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)
        finally:
            with cond:
                done.add(name)
                hand_over(i)

    handle = step_module.register_forward_pre_hook(hook)
    try:
        threads = [threading.Thread(target=worker, args=(name,), name=f"lockstep-{name}") for name in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        handle.remove()
    if errors:
        raise errors[0]
    return segments, results


def paired_ratio(numerator: list[float], denominator: list[float], resamples: int = 2000,
                 seed: int = 0) -> Ratio:
    """sum(numerator) / sum(denominator) of paired per-step times, with a 95% paired-bootstrap
    interval (steps resampled with replacement, the same indices for both sides)."""
    num, den = torch.tensor(numerator, dtype=torch.float64), torch.tensor(denominator, dtype=torch.float64)
    if num.shape != den.shape or num.numel() == 0:
        raise ValueError(f"paired_ratio needs two equally long non-empty sequences, got {num.numel()} "
                         f"and {den.numel()}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, num.numel(), (resamples, num.numel()), generator=gen)
    boot = num[idx].sum(1) / den[idx].sum(1)
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Ratio(float(num.sum() / den.sum()), low, high)


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                repeats: int = 5) -> dict:
    """The machine's dense matmul rate (FLOP/s) in `dtype`: the median over `repeats` of an
    (n x n) @ (n x n) product (2 n^3 FLOPs), after one warm-up."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    t = alternate({"matmul": lambda: a @ b}, repeats, device)["matmul"]
    flops = 2 * n**3
    return {"flops_per_s": flops / t.median, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), **t.as_dict()}


def profile_top(fn: Callable[[], object], device: torch.device, rows: int = 8) -> list[dict]:
    """Run fn() once under torch.profiler; the `rows` ops with the most self time (device time on
    CUDA, CPU time otherwise), each with its share of the total self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    return top_events(prof, device, rows)


def top_events(prof, device: torch.device, rows: int = 8) -> list[dict]:
    """The `rows` ops of a finished torch.profiler run with the most self time (see profile_top).

    Self times come straight from the raw events (an op's duration minus that of the ops nested
    in it on the same thread): torch's key_averages() builds a Python object per event first, ~8 s
    for the ~70k events of a short decode. The self times per op are key_averages()'; `calls` may
    be larger: an op calling its own out= overload counts twice (torch merges such a pair when it
    is the only nested op).
    """
    kind = "CUDA" if device.type == "cuda" else "CPU"
    per_thread: dict[int, list] = {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type().name == kind and not e.is_user_annotation():
            per_thread.setdefault(e.start_thread_id() if kind == "CPU" else e.device_resource_id(), []).append(
                (e.start_ns(), e.start_ns() + e.duration_ns(), e.name()))
    self_ns: dict[str, int] = {}
    calls: dict[str, int] = {}
    for events in per_thread.values():
        events.sort(key=lambda ev: (ev[0], -ev[1]))
        stack: list[list] = []  # [end, name, self time so far]

        def close(item):
            self_ns[item[1]] = self_ns.get(item[1], 0) + item[2]

        for start, end, name in events:
            while stack and stack[-1][0] <= start:
                close(stack.pop())
            if stack and kind == "CPU":  # nested: the parent's self time excludes it
                stack[-1][2] -= end - start
            stack.append([end, name, end - start])
            calls[name] = calls.get(name, 0) + 1
        while stack:
            close(stack.pop())
    total = sum(self_ns.values()) or 1
    top = sorted(self_ns.items(), key=lambda kv: kv[1], reverse=True)[:rows]
    return [{"op": name, "self_ms": ns / 1e6, "share": ns / total, "calls": calls[name]} for name, ns in top]
