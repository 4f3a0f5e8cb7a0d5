"""Item 5: `snakemake -n all` on the demo config when every output is already present.

A copy of the workflow (Snakefile, workflow/, config/, profiles/, results/paper) goes to a
temporary directory; every output `snakemake all --summary` lists is created there (empty files:
`--touch` only updates files that exist), `snakemake all --touch` then marks them up to date, and
the dry run is timed; it must report nothing to do. What it measures is Snakemake parsing the
Snakefile (importing mergevq.config, validating the config against the schema) and building the
64-job DAG. When it misses its goal, cProfile's top functions of one dry run say what bounds it.
"""
from __future__ import annotations

import pstats
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mergevq.bench.report import Goal, ItemResult
from mergevq.bench.scale import BenchScale
from mergevq.bench.timing import alternate
from mergevq.config import REPO_ROOT

CONFIGFILE = "config/demo.yaml"
COPIED = ("Snakefile", "workflow", "config", "profiles", "results/paper")
GOAL_S = 10.0


def snakemake_executable() -> Path:
    here = Path(sys.executable).parent / "snakemake"
    found = here if here.exists() else shutil.which("snakemake")
    if not found:
        raise FileNotFoundError("bench workflow: no `snakemake` beside the Python interpreter or on PATH")
    return Path(found)


def parse_summary(text: str) -> list[str]:
    """Output files of `snakemake --summary` output (a tab-separated table whose header starts
    with 'output_file')."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("output_file\t"))
    except StopIteration:
        raise ValueError("snakemake --summary printed no 'output_file' table") from None
    return [line.split("\t")[0] for line in lines[start + 1:] if line.strip() and "\t" in line]


def _snakemake(root: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [*prefix, str(snakemake_executable()), "all", "--cores", "1", "--configfile", CONFIGFILE, *args]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench workflow: `{' '.join(cmd[-7:])}` failed in {root}: {proc.stderr[-2000:]}")
    return proc


def populate(root: Path) -> int:
    """Copy the workflow into root and make every demo output present and up to date; returns the
    number of outputs."""
    for name in COPIED:
        src, dst = REPO_ROOT / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    outputs = parse_summary(_snakemake(root, "--summary").stdout)
    for out in outputs:
        path = root / out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    _snakemake(root, "--touch")
    return len(outputs)


def dry_run(root: Path) -> str:
    out = _snakemake(root, "-n").stdout
    if "Nothing to be done" not in out:
        raise RuntimeError(f"bench workflow: the dry run on a populated copy still has jobs to run: {out[-2000:]}")
    return out


def cprofile_top(root: Path, rows: int = 8) -> dict[str, list[dict]]:
    """cProfile of one dry run: the functions with the most own time, and the workflow's and the
    package's modules by cumulative time (what parsing the Snakefile spends where, imports included)."""
    stats_file = root / "dry_run.prof"
    _snakemake(root, "-n", prefix=(sys.executable, "-m", "cProfile", "-o", str(stats_file)))
    stats = pstats.Stats(str(stats_file))
    total = stats.total_tt or 1.0

    def row(key, value, seconds):
        (f, line, fn), (cc, nc, tt, ct, callers) = key, value
        where = next((Path(f).relative_to(base) for base in (root, REPO_ROOT) if f.startswith(str(base))), Path(f).name)
        name = f"{where}:{line} {fn}"
        return {"op": name, "self_ms": seconds * 1e3, "share": seconds / total, "calls": nc}

    items = list(stats.stats.items())
    own = sorted(items, key=lambda kv: kv[1][2], reverse=True)[:rows]
    ours = (str(root), str(REPO_ROOT / "mergevq"))
    modules = sorted(((k, v) for k, v in items if k[0].startswith(ours) and k[2] == "<module>"),
                     key=lambda kv: kv[1][3], reverse=True)[:rows]
    return {"own time": [row(k, v, v[2]) for k, v in own],
            "workflow and mergevq modules, cumulative (imports)": [row(k, v, v[3]) for k, v in modules]}


def run(scale: BenchScale, device: torch.device) -> ItemResult:
    with tempfile.TemporaryDirectory(prefix="mergevq-bench-wf-") as tmp:
        root = Path(tmp)
        n_outputs = populate(root)
        times = alternate({"dry_run": lambda: dry_run(root)}, scale.dag_repeats, torch.device("cpu"))
        t = times["dry_run"]
        goals = [Goal("dag_noop_s", t.median, "<=", GOAL_S, f"`snakemake -n all` with all {n_outputs} outputs present")]
        result = ItemResult({"dag_noop_s": t.median},
                            {"configfile": CONFIGFILE, "outputs": n_outputs, "time": t.as_dict()}, goals)
        if not goals[0].met:
            result.profile = {f"snakemake -n (cProfile), {kind}": top for kind, top in cprofile_top(root).items()}
    return result
