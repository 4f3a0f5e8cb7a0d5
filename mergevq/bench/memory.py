"""Peak memory of one side of a benchmark, measured in a process of its own.

A process's max RSS never falls, and memory one side frees stays resident in the allocator for the
other, so two sides measured in one process would each inherit the other's. `peak_memory(builder,
kwargs, device)` therefore starts `python -m mergevq.bench.memory`, which builds the side's inputs
with `builder(device=..., **kwargs)` (a "module:function" returning a zero-argument callable),
calls builder(**warmup_kwargs)() once at a toy size (one-time library set-up: BLAS buffers, thread
pools; ~40 MB on CPU), then measures one call of the side:

* CPU: the peak RSS during the call minus the RSS just before it (what the call made the process
  touch: tensors, autograd buffers, allocator slack). Linux lets a process reset its peak RSS
  (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), so imports and model building before the call
  do not count; without that, the process's max RSS over its life is used and `resolved` is False
  when the call did not raise it (the growth is then bounded by the earlier peak). The kernel's
  RSS counters are exact to a few pages (~100 KB), the noise floor of this measurement.
* CUDA: torch.cuda.max_memory_allocated over the call minus the memory allocated before it.
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys

MARKER = "MERGEVQ-BENCH-MEMORY "


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(builder: str, kwargs: dict, device: str, warmup_kwargs: dict | None = None) -> dict:
    """In this process: build the side and measure one call (see the module docstring).
    warmup_kwargs: first call builder(**warmup_kwargs)() (a toy size), so that one-time library
    set-up (BLAS buffers, thread pools) does not count as the side's memory."""
    import torch

    module, _, name = builder.partition(":")
    build = getattr(importlib.import_module(module), name)
    fn = build(device=device, **kwargs)
    if warmup_kwargs is not None:
        build(device=device, **warmup_kwargs)()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return {"peak_bytes": torch.cuda.max_memory_allocated(dev) - base, "resolved": True,
                "method": "cuda max_memory_allocated"}
    if _reset_peak_rss():
        before = _status_kib("VmRSS") * 1024
        fn()
        # max(0, .): VmRSS and VmHWM are kernel counters, exact to a few pages
        return {"peak_bytes": max(0, _status_kib("VmHWM") * 1024 - before), "resolved": True,
                "method": "peak RSS growth (reset through /proc/self/clear_refs) in a fresh process"}
    before, max_before = _status_kib("VmRSS") * 1024, _max_rss_bytes()
    fn()
    max_after = _max_rss_bytes()
    return {"peak_bytes": max(0, max_after - before), "resolved": max_after > max_before,
            "method": "max RSS growth in a fresh process"}


def peak_memory(builder: str, kwargs: dict, device: str, warmup_kwargs: dict | None = None,
                timeout: float = 900) -> dict:
    """Peak memory of one call of builder(device=device, **kwargs)() in a fresh Python process
    (after a call with warmup_kwargs, if given)."""
    spec = json.dumps({"builder": builder, "kwargs": kwargs, "device": device, "warmup_kwargs": warmup_kwargs})
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as many threads as this process
    proc = subprocess.run([sys.executable, "-m", "mergevq.bench.memory", spec], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory measurement of {builder} {kwargs} on {device} failed "
                           f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len(MARKER):])


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(MARKER + json.dumps(measure(spec["builder"], spec["kwargs"], spec["device"], spec["warmup_kwargs"])),
          flush=True)
