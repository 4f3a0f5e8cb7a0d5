"""Helpers shared by the tests that run the workflow (tests/test_slurm.py, tests/test_report_html.py):
Snakemake on a temporary working directory with the repository's Snakefile, the cluster's state
through sacct/squeue, and the dry-run job listing."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = str(VENV_BIN / "snakemake")
MERGEVQ = str(VENV_BIN / "mergevq")
# The test cluster of start-local-slurm.sh; another cluster can be named through these variables.
ACCOUNT = os.environ.get("MERGEVQ_TEST_SLURM_ACCOUNT", "mergevq-ci")
PARTITION = os.environ.get("MERGEVQ_TEST_SLURM_PARTITION", "debug")


def env(**extra: str) -> dict:
    """The environment a user's shell has after `conda activate` (or make's venv): the package's
    commands on PATH, one thread per job, no hub access."""
    out = dict(os.environ)
    out["PATH"] = f"{VENV_BIN}{os.pathsep}{out.get('PATH', '')}"
    out.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    out.pop("SLURM_JOB_ID", None)  # a test run inside a SLURM job must not requeue that job
    out.update(extra)
    return out


def snakemake(workdir: Path, configfile: Path, *args: str, environ: dict | None = None, timeout: float = 900,
              log: Path | None = None) -> subprocess.CompletedProcess:
    """`snakemake -s REPO/Snakefile -d WORKDIR ARGS... --configfile CONFIG`; output kept in `log`."""
    # --configfile last: it takes several values and would swallow the targets after it
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args, "--configfile", str(configfile)]
    res = subprocess.run(cmd, cwd=workdir, env=environ or env(), capture_output=True, text=True,
                         timeout=timeout)
    if log is not None:
        log.write_text(f"$ {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    return res


def tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


# ---- dry-run listing -----------------------------------------------------------------------------
JOB_RE = re.compile(r"^(?:local)?rule (\S+):\n((?:[ \t]+.*\n?)*)", re.M)


def dry_run_jobs(output: str) -> list[tuple[str, list[str]]]:
    """(rule, outputs) of each job a dry run lists."""
    jobs = []
    for match in JOB_RE.finditer(output):
        outputs: list[str] = []
        for line in match.group(2).splitlines():
            line = line.strip()
            if line.startswith("output:"):
                outputs = [p.strip() for p in line[len("output:"):].split(",") if p.strip()]
        jobs.append((match.group(1), outputs))
    return jobs


# ---- the SLURM cluster ---------------------------------------------------------------------------
def slurm_unavailable() -> str | None:
    """Why the SLURM tests cannot run here, or None when a cluster with accounting answers."""
    for tool in ("sbatch", "squeue", "sacct", "sinfo", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not found: no SLURM here (as root on Debian: tests/slurm/start-local-slurm.sh)"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True,
                               timeout=20)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minute"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "SLURM does not answer (sinfo/sacct timed out)"
    if nodes.returncode or not re.search(r"idle|mixed|allocated", nodes.stdout):
        return f"no usable node in partition {PARTITION!r} ({(nodes.stderr or nodes.stdout).strip()[:200]})"
    if acct.returncode:
        return f"sacct fails (no accounting: the SLURM executor would wait forever): {acct.stderr.strip()[:200]}"
    return None


def sacct_jobs(since: str, workdir: Path, duplicates: bool = False) -> list[dict]:
    """Jobs started from `workdir` since `since` (sacct's -S): JobID, State, AllocTRES, Comment, Elapsed."""
    cmd = ["sacct", "-X", "-P", "-n", "-S", since, "-o", "JobID,State,AllocTRES,Comment,WorkDir,Elapsed,ExitCode"]
    if duplicates:
        cmd.append("--duplicates")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    keys = ("id", "state", "tres", "comment", "workdir", "elapsed", "exit")
    rows = [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.count("|") == len(keys) - 1]
    return [r for r in rows if Path(r["workdir"]) == workdir]


def job_rule(comment: str) -> str:
    """The rule of a job from the plugin's --comment ('rule_train_tokenizer_wildcards_G+R')."""
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def squeue_job(workdir: Path, rule: str) -> str | None:
    """The id of a queued or running job of `rule` started from `workdir`."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%k|%Z|%T"], capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        job, comment, wd, state = (line.split("|") + ["", "", "", ""])[:4]
        if Path(wd) == workdir and job_rule(comment) == rule and state == "RUNNING":
            return job
    return None


def now_for_sacct(offset_s: int = -5) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + offset_s))
