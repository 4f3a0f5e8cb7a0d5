"""`mergevq check-quality`: the demo's key numbers against one-sided bounds kept in the repository.

A change that halves reconstruction quality still builds every table; this guard is what makes CI
fail on it. ``tests/quality_bounds.yaml`` lists, per check, the metrics file (relative to the
run's results folder, e.g. ``results/demo``), the key in it (dotted for nested values:
``rfid_gt.value``) and one bound, ``min`` (higher is better: PSNR, top-1, usage) or ``max``
(lower is better: rFID). Each check prints one line; a failed one names the metric, its file and
key, the bound and the value. A check marked ``warn_only`` (with its reason) prints WARN instead
of failing, for numbers that an open issue still moves. How the bounds were set (the seeds run,
the spread seen, the margin) is written in the bounds file itself; changing them is a deliberate,
reviewed edit of that file, never something a run does.

Exit 0 when every enforced check passes, 1 when one fails or cannot be read (a missing file or
key fails its check: a guard that skips what it cannot find guards nothing), 2 for a malformed
bounds file.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergevq.config import REPO_ROOT, ConfigError

DEFAULT_BOUNDS = REPO_ROOT / "tests" / "quality_bounds.yaml"
CHECK_KEYS = {"metric", "file", "key", "min", "max", "warn_only", "measured", "degraded"}


@dataclass(frozen=True)
class Check:
    metric: str            # what a reader calls it: "G+R PSNR with S (dB)"
    file: str              # relative to the run's results folder
    key: str               # dotted path into the JSON
    bound: float
    higher_is_better: bool  # min bound when True, max bound when False
    warn_only: str | None   # the reason it only warns, or None


@dataclass(frozen=True)
class Outcome:
    check: Check
    value: float | None
    problem: str | None     # None: within the bound

    @property
    def status(self) -> str:
        if self.problem is None:
            return "ok"
        return "WARN" if self.check.warn_only else "FAIL"

    def line(self) -> str:
        c = self.check
        where = f"[{c.file} {c.key}]"
        if self.problem is None:
            sign = ">=" if c.higher_is_better else "<="
            return f"ok    {c.metric} = {self.value:.4g} {sign} {c.bound:g} {where}"
        text = f"{self.status:<5} {c.metric} {where}: {self.problem}"
        return text + (f" (warn only: {c.warn_only})" if c.warn_only else "")


def load_bounds(path: str | Path) -> tuple[str, list[Check]]:
    """(run, checks) of a bounds file; ConfigError naming the entry for anything malformed."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"bounds file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("run"), str) or not isinstance(doc.get("checks"), list):
        raise ConfigError(f"{path}: needs `run: <name>` and a `checks:` list")
    checks = []
    for i, entry in enumerate(doc["checks"]):
        where = f"{path}: checks[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: not a mapping")
        where += f" ({entry.get('metric', '?')})"
        unknown = set(entry) - CHECK_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(CHECK_KEYS))})")
        missing = [k for k in ("metric", "file", "key") if not entry.get(k)]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        sides = [k for k in ("min", "max") if k in entry]
        if len(sides) != 1:
            raise ConfigError(f"{where}: give exactly one of min (higher is better) or max (lower is better)")
        bound = entry[sides[0]]
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise ConfigError(f"{where}: {sides[0]} must be a finite number, got {bound!r}")
        warn = entry.get("warn_only")
        if warn is not None and not (isinstance(warn, str) and warn.strip()):
            raise ConfigError(f"{where}: warn_only must say why (a sentence), got {warn!r}")
        checks.append(Check(str(entry["metric"]), str(entry["file"]), str(entry["key"]), float(bound),
                            sides[0] == "min", warn))
    if not checks:
        raise ConfigError(f"{path}: `checks:` is empty")
    return doc["run"], checks


def lookup(record: dict, dotted: str):
    """record["a"]["b"] for "a.b"; KeyError naming the first missing part."""
    node = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(part)
        node = node[part]
    return node


def evaluate_check(check: Check, results: Path, cache: dict[Path, dict | str]) -> Outcome:
    path = results / check.file
    if path not in cache:
        try:
            cache[path] = json.loads(path.read_text())
        except FileNotFoundError:
            cache[path] = f"{path} not found (did the run make it?)"
        except (OSError, json.JSONDecodeError) as exc:
            cache[path] = f"{path} cannot be read ({exc})"
    record = cache[path]
    if isinstance(record, str):
        return Outcome(check, None, record)
    try:
        value = lookup(record, check.key)
    except KeyError as exc:
        return Outcome(check, None, f"{path} has no key {check.key} (missing part {exc.args[0]!r})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return Outcome(check, None, f"value {value!r} is not a finite number")
    value = float(value)
    if check.higher_is_better and value < check.bound:
        return Outcome(check, value, f"{value:.4g} is below the bound min {check.bound:g}")
    if not check.higher_is_better and value > check.bound:
        return Outcome(check, value, f"{value:.4g} is above the bound max {check.bound:g}")
    return Outcome(check, value, None)


def check_quality(results: str | Path, bounds: str | Path = DEFAULT_BOUNDS) -> list[Outcome]:
    """Every check of `bounds` evaluated on the run folder `results`, in the file's order."""
    _, checks = load_bounds(bounds)
    cache: dict[Path, dict | str] = {}
    return [evaluate_check(c, Path(results), cache) for c in checks]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bounds", type=Path, default=DEFAULT_BOUNDS, help=f"bounds file (default: {DEFAULT_BOUNDS.relative_to(REPO_ROOT)})")
    p.add_argument("--results", type=Path, default=None,
                   help="the run's results folder (default: results/<run> of the bounds file, from the repository root)")


def run(args: argparse.Namespace) -> int:
    run_name, _ = load_bounds(args.bounds)
    results = args.results or REPO_ROOT / "results" / run_name
    if not results.is_dir():
        raise FileNotFoundError(f"results folder not found: {results} (run `make demo` first)")
    outcomes = check_quality(results, args.bounds)
    for o in outcomes:
        print(o.line())
    failed = [o for o in outcomes if o.status == "FAIL"]
    warned = [o for o in outcomes if o.status == "WARN"]
    print(f"quality guard ({args.bounds.name}, {results}): {len(outcomes) - len(failed) - len(warned)} ok, "
          f"{len(warned)} warned (warn-only checks outside their bound or unread), {len(failed)} failed")
    if failed:
        raise QualityError(f"{len(failed)} metric(s) outside their bound: "
                           + "; ".join(f"{o.check.metric} ({o.problem})" for o in failed))
    return 0


class QualityError(RuntimeError):
    """Enforced checks failed; the message names each metric, its bound and value."""
