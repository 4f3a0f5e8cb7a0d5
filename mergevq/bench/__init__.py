"""`mergevq bench`: the paper's efficiency claims and ours, each measured as a ratio of two ways of
doing the same work in one process (ratios carry across machines; absolute times do not).

Items (`--only NAME ...` picks some; each module's docstring says exactly what it measures):
  lfq       LFQ entropy at 2^18 codes, 8 images x 256 tokens, forward + backward: the exact
            factorised entropies against the dense (B*N x 2^18 logits) formulation
  tome      paper G+R and R encoders merging to their K against no merging: speed-up, FLOPs ratio
  mergear   MergeAR decoding, pruned KV cache against the full cache, on real code sequences
  train     one tokenizer training step's FLOPs/s as a share of the machine's matmul rate (MFU)
  workflow  `snakemake -n all` on the demo config with every output present
Timed pairs alternate after a warm-up and report medians with their range; peak memory is measured
per side in a fresh process. `--device cuda` runs the GPU mode (bf16, `--compile` for the
encoders); `--scale tiny` runs every item at toy sizes in seconds (a smoke test, not a benchmark).
A figure that misses its goal comes with the top kernels of a torch.profiler run of it.
Each item has a stated wall-time budget (`BenchScale.budget_s`) and repeat counts; the JSON records
each item's wall and CPU seconds and the load average, since another process on the machine slows
every figure's absolute time (ratios much less). Torch uses every core (`--threads` to change).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import resource
import sys
import time
import traceback

import torch

from mergevq.bench.report import ItemResult, fmt, goals_table, profile_table
from mergevq.bench.scale import SCALES

ITEMS: dict[str, str] = {
    "lfq": "mergevq.bench.lfq",
    "tome": "mergevq.bench.tome",
    "mergear": "mergevq.bench.mergear",
    "train": "mergevq.bench.train",
    "workflow": "mergevq.bench.workflow",
}
# the JSON's headline keys, per item (all present in a full run; null for an item that could not run)
KEYS: dict[str, tuple[str, ...]] = {
    "lfq": ("lfq_memory_ratio", "lfq_speed_ratio", "lfq_entropy_abs_diff"),
    "tome": ("tome_speedup", "tome_flops_ratio", "tome_efficiency"),
    "mergear": ("mergear_speedup", "mergear_kv_ratio", "mergear_flop_model_speedup"),
    "train": ("train_mfu", "train_mfu_demo"),
    "workflow": ("dag_noop_s",),
}


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (e.g. --device cuda without CUDA)."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise BenchError("--device cuda: torch.cuda.is_available() is False (no CUDA device, or a "
                             "CPU-only torch build); run on a GPU machine or use --device cpu")
        return torch.device("cuda", torch.cuda.current_device())
    if name != "cpu":
        raise BenchError(f"--device must be cpu or cuda, got {name!r}")
    return torch.device("cpu")


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"host": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="+", choices=list(ITEMS), metavar="NAME",
                        help=f"run only these items ({', '.join(ITEMS)}; default: all)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write every figure and its details here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu (fp32) or cuda (bf16; the paper-size MergeAR)")
    parser.add_argument("--scale", default="full", choices=list(SCALES),
                        help="full: the issue's sizes (14 min on a shared 2-core machine); tiny: toy sizes, seconds")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the ToMe encoders (--device cuda only)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: every core this process may run on)")


def command_line(args: argparse.Namespace) -> str:
    """The `mergevq bench` command that reproduces this run."""
    parts = ["mergevq bench", f"--device {args.device}", f"--scale {args.scale}"]
    parts += [f"--only {' '.join(args.only)}"] if args.only else []
    parts += ["--compile"] if args.compile else []
    parts += [f"--threads {args.threads}"] if args.threads else []
    parts += [f"--json {args.json}"] if args.json else []
    return " ".join(parts)


def run_item(name: str, scale, device: torch.device, compile_: bool) -> ItemResult:
    module = importlib.import_module(ITEMS[name])
    if name == "tome":
        return module.run(scale, device, compile_=compile_)
    return module.run(scale, device)


def cpu_threads(requested: int | None) -> int:
    """Torch's intra-op threads for the bench: `requested`, or every core this process may run on
    (os.sched_getaffinity; OMP_NUM_THREADS in the environment does not decide it)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = available if requested is None else requested
    if threads < 1:
        raise BenchError(f"--threads must be >= 1, got {threads}")
    return threads


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished subprocesses (memory probes,
    Snakemake). On a loaded machine, elapsed time / CPU seconds says how much of the cores the bench
    had: with T threads, CPU seconds / T is about what an idle machine's wall time would be."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.compile and device.type != "cuda":
        raise BenchError("--compile is for --device cuda (on CPU it only adds compile time)")
    threads, before = cpu_threads(args.threads), torch.get_num_threads()
    torch.set_num_threads(threads)  # the memory probe's subprocesses use as many
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(before)


def _run(args: argparse.Namespace, device: torch.device) -> int:
    scale = SCALES[args.scale]
    names = args.only or list(ITEMS)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    report: dict = {"command": command_line(args),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "device": str(device), "scale": scale.name, "machine": machine(device),
                    "load_average_start": list(os.getloadavg()), "items": {}, "goals": {}}
    results: dict[str, ItemResult] = {}
    failed: list[str] = []
    for name in names:
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        budget = scale.budget_s[name]
        print(f"[bench] {name} (budget {budget:.0f} s) ...", file=sys.stderr, flush=True)
        try:
            res = run_item(name, scale, device, args.compile)
        except ImportError as exc:  # a part not built yet: say so by name, run the rest
            report["items"][name] = {"skipped": f"needs {exc.name or exc}: {exc}"}
            report.update({key: None for key in KEYS[name]})
            print(f"[bench] {name}: skipped, needs {exc.name or exc}", file=sys.stderr, flush=True)
            continue
        except Exception as exc:  # noqa: BLE001 - recorded, the other items still run; exit status 1
            traceback.print_exc()
            report["items"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            report.update({key: None for key in KEYS[name]})
            failed.append(name)
            print(f"[bench] {name}: FAILED ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
            continue
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        results[name] = res
        report.update(res.keys)
        report["items"][name] = {"elapsed_s": elapsed, "cpu_s": cpu, "budget_s": budget,
                                 "over_budget": elapsed > budget,
                                 "repeats": scale.stated_repeats(name),
                                 **res.details, **({"profile": res.profile} if res.profile is not None else {})}
        report["goals"].update({g.key: g.as_dict() for g in res.goals})
        summary = ", ".join(f"{k} {fmt(v) if not isinstance(v, dict) else {a: fmt(b) for a, b in v.items()}}"
                            for k, v in res.keys.items())
        over = f", OVER its {budget:.0f} s budget" if elapsed > budget else ""
        print(f"[bench] {name} ({elapsed:.0f} s, {cpu:.0f} CPU s{over}): {summary}", file=sys.stderr, flush=True)
    report["elapsed_s"] = time.perf_counter() - started
    report["cpu_s"] = cpu_seconds() - cpu_started
    report["load_average_end"] = list(os.getloadavg())
    if args.json:
        from mergevq.files import write_json

        write_json(args.json, report)
    print(goals_table(results))
    for name, res in results.items():
        if res.profile is not None:
            for label, prof in res.profile.items():
                print(f"\nProfile ({name}, {label}): what bounds a missed goal\n{profile_table(prof)}")
    print(f"\n{len(results)} item(s) in {report['elapsed_s']:.0f} s ({report['cpu_s']:.0f} CPU s) on "
          f"{report['machine']['cpu']} "
          f"({report['machine']['torch_threads']} torch threads, device {device}; load average "
          f"{report['load_average_start'][0]:.2f} at the start, {report['load_average_end'][0]:.2f} at the end)")
    if failed:
        print(f"mergevq bench: error: {', '.join(failed)} failed (tracebacks above; null keys in the JSON)",
              file=sys.stderr)
        return 1
    return 0


__all__ = ["BenchError", "ITEMS", "KEYS", "add_arguments", "resolve_device", "run"]
