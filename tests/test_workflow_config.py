"""How DAG jobs receive the config (content-addressed file, MERGEVQ_CONFIG), on a real Snakemake run.

The workflow runs for real in a temporary copy of the repository, with a stand-in `mergevq` first on
PATH that writes each job's declared outputs (it checks the config file the job was handed exists
and matches its hash, then writes placeholders). Snakemake therefore records real metadata (params,
inputs, code), which is what its rerun triggers compare, without training anything.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"

# Writes what a job declares: `--out X` / `--json X` (a directory gets model.pt, or a code split's
# manifest, or a sample folder's files), and a table's .md twin.
STAND_IN = textwrap.dedent(f"""\
    #!{sys.executable}
    import os, sys, yaml
    from pathlib import Path
    from mergevq.config import config_hash
    cfg_path = Path(os.environ["MERGEVQ_CONFIG"])
    args = sys.argv[1:]
    assert args[args.index("--config") + 1] == str(cfg_path), args
    cfg = yaml.safe_load(cfg_path.read_text())  # written by the Snakefile's onstart
    assert config_hash(cfg) == cfg_path.stem, cfg_path
    for flag in ("--out", "--json"):
        if flag in args:
            out = Path(args[args.index(flag) + 1])
            if args[0] == "extract-codes":
                targets = [out / (args[args.index("--split") + 1] + ".json")]
            elif args[0] == "sample":  # a folder such as cfg1.5
                targets = [out / name for name in ("samples.json", "samples.npz", "codes.pt")]
            elif out.suffix:
                targets = [out] + ([out.with_suffix(".md")] if args[0] == "table" else [])
            else:
                targets = [out / "model.pt"]
            for target in targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(" ".join(args))
    """)


def _snakemake(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{cwd / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([str(SNAKEMAKE), "all", "--cores", "2", "--configfile", "config/demo.yaml", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _jobs_listed(dry_run_stdout: str) -> set[str]:
    """Rule names of the jobs a dry run would run (its 'Job stats' table)."""
    lines = dry_run_stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("job ")) + 2
    rules = set()
    for line in lines[start:]:
        name = line.split()[0] if line.split() else ""
        if not name or name == "total":
            break
        rules.add(name)
    return rules


@pytest.fixture(scope="module")
def populated_run(tmp_path_factory) -> Path:
    """A copy of the workflow whose demo DAG has run completely (stand-in jobs)."""
    root = tmp_path_factory.mktemp("wf")
    for name in ("Snakefile", "workflow", "config", "profiles", "results"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    (root / "bin").mkdir()
    stand_in = root / "bin" / "mergevq"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    proc = _snakemake(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    configs = list((root / "results" / "demo" / "configs").glob("*.yaml"))
    assert len(configs) == 1, configs
    return root


def test_dry_runs_write_nothing(populated_run):
    before = _tree_digest(populated_run / "results")
    for override in ([], ["--config", 'eval={"fid": {"batch_size": 7}}'], ["--config", "seed=3"]):
        proc = _snakemake(populated_run, "-n", *override)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _tree_digest(populated_run / "results") == before, f"dry run {override} changed results/"


def test_fresh_dry_run_creates_no_results(tmp_path):
    for name in ("Snakefile", "workflow", "config", "profiles"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    proc = subprocess.run([str(SNAKEMAKE), "all", "-n", "--cores", "1", "--configfile", "config/demo.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "results").exists()


def test_eval_setting_reruns_evaluation_not_training(populated_run):
    proc = _snakemake(populated_run, "-n", "--config", 'eval={"fid": {"batch_size": 7}}')
    listed = _jobs_listed(proc.stdout)
    assert "evaluate_tokenizer" in listed, proc.stdout[-3000:]  # the control: the change is seen at all
    assert not listed & {"train_tokenizer", "train_ssl_teacher", "linear_probe", "finetune"}, listed


def test_variant_setting_reruns_that_variant_only(populated_run):
    proc = _snakemake(populated_run, "-n", "--config", 'tokenizer={"variants": {"G": {"steps": 301}}}')
    assert "train_tokenizer" in _jobs_listed(proc.stdout), proc.stdout[-3000:]
    assert "output: results/demo/tokenizer/G/model.pt" in proc.stdout
    assert "output: results/demo/tokenizer/R/model.pt" not in proc.stdout
    assert "output: results/demo/tokenizer/G+R/model.pt" not in proc.stdout


def test_changed_config_gets_a_new_file_and_leaves_the_old_one(populated_run):
    configs = populated_run / "results" / "demo" / "configs"
    old = {p.name: p.read_bytes() for p in configs.glob("*.yaml")}
    proc = _snakemake(populated_run, "--config", 'eval={"fid": {"batch_size": 7}}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    now = {p.name: p.read_bytes() for p in configs.glob("*.yaml")}
    assert len(now) == 2 and all(now[name] == body for name, body in old.items())


def test_dotted_config_override_is_refused_by_snakemake_and_nested_form_works(populated_run):
    # Snakemake itself refuses `--config data.root=/x` ("must start with a valid identifier"); the
    # README documents the nested form, which mergevq deep-merges into the one config file.
    dotted = _snakemake(populated_run, "-n", "--config", "eval.fid.batch_size=7")
    assert dotted.returncode != 0
    nested = _snakemake(populated_run, "-n", "--config", 'data={"root": "/x", "dataset": "imagefolder"}')
    assert nested.returncode == 0, nested.stderr[-3000:]
