"""The quality guard (`mergevq check-quality`, tests/quality_bounds.yaml): every run recorded in the
bounds file passes it (the bounds are wide enough for seed-to-seed variation), the deliberately
degraded model recorded there fails it by name, bound and value (tight enough), and the guard fails,
never skips, a number it cannot read. Result folders are built from the recorded numbers, so the
file takes seconds; the numbers themselves come from real runs (how: the bounds file's header).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
import harness  # noqa: E402

from mergevq.cli import main  # noqa: E402
from mergevq.config import ConfigError  # noqa: E402
from mergevq.report.quality import DEFAULT_BOUNDS, check_quality, load_bounds  # noqa: E402

BOUNDS = yaml.safe_load(DEFAULT_BOUNDS.read_text())
RUNS = sorted({run for check in BOUNDS["checks"] for run in check["measured"]})
REFERENCE = "seed0"  # the timed fresh-clone `make demo`: the other numbers of a degraded result set


def results_tree(root: Path, values: dict[int, float], bounds: Path | None = None) -> Path:
    """A results folder holding, for check i of the bounds file, values[i] at its file and key."""
    checks = load_bounds(bounds or DEFAULT_BOUNDS)[1]
    records: dict[str, dict] = {}
    for i, check in enumerate(checks):
        if i not in values:
            continue
        node = records.setdefault(check.file, {})
        *parents, leaf = check.key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = values[i]
    for file, record in records.items():
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).write_text(json.dumps(record))
    return root


def measured(run: str) -> dict[int, float]:
    return {i: c["measured"][run] for i, c in enumerate(BOUNDS["checks"]) if run in c["measured"]}


def test_bounds_file_is_well_formed_and_one_sided():
    run, checks = load_bounds(DEFAULT_BOUNDS)
    assert run == "demo"
    names = [c.metric for c in checks]
    assert len(set(names)) == len(names)
    for check, raw in zip(checks, BOUNDS["checks"]):
        assert raw["measured"], check.metric  # every bound records the runs it was set from
        # wide enough: every recorded run is inside its bound with room to spare
        for run_name, value in raw["measured"].items():
            assert (value > check.bound) if check.higher_is_better else (value < check.bound), (check.metric, run_name)


def test_bounds_cover_every_variant_and_kind():
    """Per variant: PSNR with S and with S-hat, rFID, probe top-1, codebook usage; per generator:
    class consistency (the issue's list)."""
    checks = load_bounds(DEFAULT_BOUNDS)[1]
    demo = yaml.safe_load((harness.REPO / "config" / "demo.yaml").read_text())
    for variant, var in demo["tokenizer"]["variants"].items():
        keys = {(c.file, c.key) for c in checks}
        sweep = f"sweep/{variant}/k{var['kept']}/metrics.json"
        assert {(sweep, "psnr_gt"), (sweep, "psnr_ft"), (sweep, "rfid_gt.value"), (sweep, "codebook_usage"),
                (f"probe/{variant}/k{var['kept']}/metrics.json", "top1")} <= keys, variant
    generators = [(g, v) for g in ("llamagen", "mergear", "randar") for v in demo["generator"].get(g, {}).get("variants", [])]
    assert generators
    for gen, variant in generators:
        assert (f"samples/{gen}_{variant}/final/metrics.json", "class_consistency.top1") in {(c.file, c.key) for c in checks}


def test_bounds_name_files_the_demo_makes():
    res = subprocess.run([harness.SNAKEMAKE, "-n", "all", "--configfile", "config/demo.yaml", "--cores", "1", "--forceall"],
                         cwd=harness.REPO, env=harness.env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, harness.tail(res.stdout + res.stderr)
    outputs = {o for _, outs in harness.dry_run_jobs(res.stdout) for o in outs}
    for check in load_bounds(DEFAULT_BOUNDS)[1]:
        assert f"results/demo/{check.file}" in outputs, check.file


@pytest.mark.parametrize("run", RUNS)
def test_every_recorded_run_passes(tmp_path, run):
    outcomes = check_quality(results_tree(tmp_path, measured(run)))
    recorded = measured(run)
    for i, outcome in enumerate(outcomes):
        if i in recorded:
            assert outcome.status == "ok", outcome.line()


def test_degraded_model_fails_by_name_bound_and_value(tmp_path, capsys):
    """The degraded model's numbers (recorded in the bounds file), with every other number from the
    reference run: the guard fails, naming each metric outside its bound with the bound and the
    value, and a halved reconstruction (PSNR with S, rFID) is among them."""
    values = measured(REFERENCE)
    degraded = {i: c["degraded"] for i, c in enumerate(BOUNDS["checks"]) if "degraded" in c}
    checks = load_bounds(DEFAULT_BOUNDS)[1]
    outside = {i for i, v in degraded.items() if (v < checks[i].bound if checks[i].higher_is_better else v > checks[i].bound)}
    assert {checks[i].key for i in outside} >= {"psnr_gt", "rfid_gt.value"}
    results = results_tree(tmp_path, values | degraded)
    code = main(["check-quality", "--results", str(results)])
    out, err = capsys.readouterr()
    assert code == 1
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == len(outside)
    for i in outside:
        check = checks[i]
        line = next((f for f in failed if f"FAIL  {check.metric} [" in f), None)
        side = "min" if check.higher_is_better else "max"
        assert line and f"{degraded[i]:.4g}" in line and f"bound {side} {check.bound:g}" in line, (check.metric, out)
        assert check.metric in err
    assert err.count("mergevq check-quality: error:") == 1


def test_guard_fails_on_a_missing_file_or_key_and_never_skips(tmp_path, capsys):
    values = measured(REFERENCE)
    results = results_tree(tmp_path, values)
    checks = load_bounds(DEFAULT_BOUNDS)[1]
    first = checks[0]
    record = json.loads((results / first.file).read_text())
    record.pop(first.key.split(".")[0])
    (results / first.file).write_text(json.dumps(record))
    gone = next(c for c in checks if c.file != first.file and not c.warn_only)
    (results / gone.file).unlink()
    outcomes = {o.check.metric: o for o in check_quality(results)}
    assert outcomes[first.metric].status == "FAIL" and f"no key {first.key}" in outcomes[first.metric].problem
    assert outcomes[gone.metric].status == "FAIL" and "not found" in outcomes[gone.metric].problem
    assert main(["check-quality", "--results", str(results)]) == 1
    capsys.readouterr()


def test_warn_only_check_warns_and_exits_zero(tmp_path, capsys):
    bounds = tmp_path / "bounds.yaml"
    bounds.write_text(yaml.safe_dump({"run": "x", "checks": [
        {"metric": "psnr", "file": "m.json", "key": "a.psnr", "min": 20.0, "measured": {"seed0": 21.0}},
        {"metric": "consistency", "file": "m.json", "key": "cc", "min": 0.8, "warn_only": "the generator issue moves it",
         "measured": {"seed0": 0.9}}]}))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "m.json").write_text(json.dumps({"a": {"psnr": 20.5}, "cc": 0.5}))
    assert main(["check-quality", "--bounds", str(bounds), "--results", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "ok    psnr = 20.5 >= 20" in out
    assert "WARN  consistency [m.json cc]: 0.5 is below the bound min 0.8 (warn only: the generator issue moves it)" in out
    (tmp_path / "r" / "m.json").write_text(json.dumps({"a": {"psnr": math.nan}, "cc": 0.9}))
    assert main(["check-quality", "--bounds", str(bounds), "--results", str(tmp_path / "r")]) == 1
    assert "value nan is not a finite number" in capsys.readouterr().out


@pytest.mark.parametrize("entry,message", [
    ({"metric": "m", "file": "f", "key": "k", "min": 1, "max": 2}, "exactly one of min"),
    ({"metric": "m", "file": "f", "key": "k"}, "exactly one of min"),
    ({"metric": "m", "file": "f", "key": "k", "mni": 1}, "unknown key(s) mni"),
    ({"metric": "m", "file": "f", "min": 1}, "missing key"),
    ({"metric": "m", "file": "f", "key": "k", "min": "high"}, "min must be a finite number"),
    ({"metric": "m", "file": "f", "key": "k", "min": 1, "warn_only": True}, "warn_only must say why"),
])
def test_malformed_bounds_are_refused_by_entry(tmp_path, entry, message):
    bounds = tmp_path / "bounds.yaml"
    bounds.write_text(yaml.safe_dump({"run": "x", "checks": [entry]}))
    with pytest.raises(ConfigError, match=r"checks\[0\] \(m\): .*" + message.replace("(", r"\(").replace(")", r"\)")):
        load_bounds(bounds)
