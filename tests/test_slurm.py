"""The cluster path. Without a cluster: `mergevq cluster-setup` installs the project's SLURM profile as
the user's `slurm` profile, after which `snakemake --profile slurm all -n` works typed as is, and the
trainer's self-requeue decides right from the job's state. On a real SLURM (tests marked `slurm`;
`tests/slurm/start-local-slurm.sh` starts one as root, `.ci/run` does): a reduced demo target through
that same profile (only account and partition filled in), GPU rules submitted with --gpus, every
job in sacct; and preemption: SIGTERM mid-training, from `scancel --signal=TERM` and from the
time-limit warning, writes a checkpoint, requeues the job, resumes at the step it stopped and ends
with the weights of an uninterrupted run, without spending any of Snakemake's retries.
"""
from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
import harness  # noqa: E402
from harness import MERGEVQ, REPO, SNAKEMAKE  # noqa: E402
from reduced_config import VARIANT, reduced_config  # noqa: E402

from mergevq import cluster  # noqa: E402
from mergevq.train.signals import requeue_slurm_job  # noqa: E402


# ---- profile set-up (no cluster needed) -----------------------------------------------------------
def test_rendered_profile_fills_account_and_partition_only():
    text = cluster.render_profile("acc1", "gpu-part")
    prof = yaml.safe_load(text)
    template = yaml.safe_load(cluster.PROFILE_TEMPLATE.read_text())
    assert "CHANGE_ME" not in text
    assert prof["default-resources"]["slurm_account"] == "acc1"
    assert prof["default-resources"]["slurm_partition"] == "gpu-part"
    assert prof["executor"] == "slurm" and prof["slurm-requeue"] is True
    for key in set(template) - {"default-resources"}:
        assert prof[key] == template[key], key
    with pytest.raises(cluster.SetupError, match="plain SLURM account"):
        cluster.render_profile("my account", "p")


def test_cluster_setup_installs_once_and_never_overwrites_silently(tmp_path):
    env = harness.env(XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    target = tmp_path / "xdg" / "snakemake" / "slurm" / "config.yaml"

    def setup(*args):
        return subprocess.run([MERGEVQ, "cluster-setup", *args], env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)

    first = setup("--account", "a1", "--partition", "p1")
    assert first.returncode == 0, first.stderr
    assert "installed" in first.stdout and yaml.safe_load(target.read_text())["default-resources"]["slurm_account"] == "a1"
    same = setup("--account", "a1", "--partition", "p1")
    assert same.returncode == 0 and "unchanged" in same.stdout
    other = setup("--account", "a2", "--partition", "p1")
    assert other.returncode == 1
    assert "exists and differs" in other.stderr and "--force" in other.stderr and '+  slurm_account: "a2"' in other.stderr
    assert yaml.safe_load(target.read_text())["default-resources"]["slurm_account"] == "a1"
    forced = setup("--account", "a2", "--partition", "p1", "--force")
    assert forced.returncode == 0
    assert yaml.safe_load(target.read_text())["default-resources"]["slurm_account"] == "a2"
    assert yaml.safe_load(target.with_name("config.yaml.bak").read_text())["default-resources"]["slurm_account"] == "a1"


def test_cluster_setup_links_data_root_and_weights(tmp_path):
    data = tmp_path / "imagenet"
    (data / "train" / "n01").mkdir(parents=True)
    (data / "val" / "n01").mkdir(parents=True)
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "vgg16.pth").write_bytes(b"x")
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["data"]["root"] = str(tmp_path / "site" / "imagenet")
    cfg["weights"] = {"dinov2_base": str(tmp_path / "site" / "w" / "dino.pth"),
                      "vgg16": str(tmp_path / "site" / "w" / "vgg16.pth"), "inception": None, "adm_reference": None}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = harness.env(XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    cmd = [MERGEVQ, "cluster-setup", "--account", "a", "--partition", "p", "--config", str(tmp_path / "cfg.yaml"),
           "--data-root", str(data), "--weights-dir", str(weights)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "site" / "imagenet").resolve() == data.resolve()
    assert (tmp_path / "site" / "w" / "vgg16.pth").resolve() == (weights / "vgg16.pth").resolve()
    assert "weights.dinov2_base" in res.stdout and "fetch-weights" in res.stdout  # absent there: named, not linked
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert again.returncode == 0 and "already linked" in again.stdout
    bad = subprocess.run(cmd[:8] + ["--data-root", str(tmp_path)], env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=120)
    assert bad.returncode == 1 and "train/<class>/ and val/<class>/" in bad.stderr


def test_profile_slurm_dry_run_typed_as_is(tmp_path):
    """After the one-time set-up, `snakemake --profile slurm all -n` from the repository root (the
    paper config) builds the whole DAG; nothing is written (a dry run writes no resolved config)."""
    env = harness.env(XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    setup = subprocess.run([MERGEVQ, "cluster-setup", "--account", "a", "--partition", "p"], env=env,
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert setup.returncode == 0, setup.stderr
    before = set((REPO / "results").glob("imagenet/configs/*"))
    res = subprocess.run([SNAKEMAKE, "--profile", "slurm", "all", "-n"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, harness.tail(res.stdout + res.stderr)
    assert "Using profiles slurm" in res.stderr  # (and the workflow profile profiles/default)
    assert "slurm_account=a, slurm_partition=p" in res.stdout  # the installed profile's resources
    rules = {rule for rule, _ in harness.dry_run_jobs(res.stdout)}
    assert {"train_tokenizer", "evaluate_tokenizer", "table", "figure_tradeoff"} <= rules
    assert set((REPO / "results").glob("imagenet/configs/*")) == before


def test_table_and_figure_rules_are_localrules():
    """They run on the submitting node under --profile slurm (the SLURM test checks sacct too)."""
    text = (REPO / "Snakefile").read_text()
    block = re.search(r"^localrules:\n((?:[ \t]+\w+,?\n)+)", text, re.M)
    assert block, "the Snakefile declares no localrules"
    local = set(re.findall(r"\w+", block.group(1)))
    report_rules = set(re.findall(r"^rule ((?:table|figure)\w*):", (REPO / "workflow/rules/report.smk").read_text(), re.M))
    assert report_rules and report_rules <= local


# ---- self-requeue decision (fake scontrol) --------------------------------------------------------
def fake_scontrol(state: str, batch: str = "1", requeue_rc: int = 0):
    calls = []

    def run(*args):
        calls.append(args)
        if args[0] == "show":
            return subprocess.CompletedProcess(args, 0, f"JobId={args[-1]} JobState={state} BatchFlag={batch} Requeue=1\n", "")
        return subprocess.CompletedProcess(args, requeue_rc, "", "" if requeue_rc == 0 else "Requested operation is presently disabled")

    return run, calls


@pytest.mark.parametrize("state,batch,rc,expect", [
    ("RUNNING", "1", 0, True),         # preemption warning / scancel --signal=TERM / time-limit warning
    ("COMPLETING", "1", 0, False),     # plain scancel: the job is being cancelled, it must stay cancelled
    ("CANCELLED", "1", 0, False),
    ("RUNNING", "0", 0, False),        # interactive allocation (salloc/srun): not requeueable
    ("RUNNING", "1", 1, False),        # --no-requeue / JobRequeue=0: Snakemake's retry resumes instead
])
def test_requeue_only_a_running_batch_job(state, batch, rc, expect):
    run, calls = fake_scontrol(state, batch, rc)
    requeued, line = requeue_slurm_job({"SLURM_JOB_ID": "42"}, scontrol=run)
    assert requeued is expect
    assert "42" in line
    assert (("requeue", "42") in calls) == (state == "RUNNING" and batch == "1")


def test_no_requeue_outside_slurm():
    run, calls = fake_scontrol("RUNNING")
    assert requeue_slurm_job({}, scontrol=run) == (False, "not a SLURM job: exiting for Snakemake's retry to resume")
    assert calls == []


class TinyStage:
    """A linear regression through the one training loop; `signal_in` names the hook that sends
    this process SIGTERM (as SLURM's warning would), to probe where fit() tolerates it."""

    name = "tiny"

    def __init__(self, signal_in: str | None = None):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.signal_in = signal_in

    def _maybe_signal(self, where: str) -> None:
        if self.signal_in == where:
            os.kill(os.getpid(), signal.SIGTERM)

    def train_step(self, batch, step):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.model(x).squeeze(-1), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach())}

    def validate(self, step, out_dir):
        return {}

    def state_dict(self):
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])

    def artifact(self):
        self._maybe_signal("artifact")
        return {"weights": self.model.state_dict()}


@pytest.mark.parametrize("signal_in", [None, "artifact"])
def test_sigterm_after_the_last_step_does_not_fail_a_finished_training(tmp_path, signal_in):
    """SLURM's time-limit warning can land after the last step, while the final checkpoint and
    model.pt are written: the training completes and reports success (no requeue, no retry)."""
    from torch.utils.data import TensorDataset

    from mergevq.train.loop import LoopConfig, fit

    data = TensorDataset(torch.randn(64, 4), torch.randn(64))
    loop = LoopConfig(total_steps=6, batch_size=8, seed=0, log_every=2, val_every=100, ckpt_every=100)
    outside = []  # a signal fit() does not catch lands here (the process's own handler: death, on SLURM)

    def recorder(signum, frame):
        outside.append(signum)

    previous = signal.signal(signal.SIGTERM, recorder)
    try:
        code = fit(TinyStage(signal_in), data, loop, tmp_path / "run", {}, "hash")
        assert signal.getsignal(signal.SIGTERM) is recorder  # fit restores the handler it found
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert outside == []
    assert code == 0
    assert (tmp_path / "run" / "model.pt").exists()


# ---- on a real SLURM -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm_profile(tmp_path_factory):
    """The cluster user's set-up: `mergevq cluster-setup` with the test cluster's account and
    partition; returns the environment in which `--profile slurm` finds it."""
    reason = harness.slurm_unavailable()
    if reason:
        if os.environ.get("MERGEVQ_REQUIRE_SLURM") == "1":
            pytest.fail(f"MERGEVQ_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    env = harness.env(XDG_CONFIG_HOME=str(tmp_path_factory.mktemp("xdg")))
    res = subprocess.run([MERGEVQ, "cluster-setup", "--account", harness.ACCOUNT, "--partition", harness.PARTITION],
                         env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert res.returncode == 0, res.stderr
    return env


# Test-speed settings on the command line; everything else comes from the installed profile.
FAST_STATUS = ["--slurm-init-seconds-before-status-checks", "2"]


@pytest.mark.slurm
def test_reduced_demo_target_runs_as_slurm_jobs(slurm_profile, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    cfg = tmp_path / "reduced.yaml"
    cfg.write_text(yaml.safe_dump(reduced_config(), sort_keys=False))
    since = harness.now_for_sacct()
    res = harness.snakemake(work, cfg, "--profile", "slurm", *FAST_STATUS, "results/reduced/tables/table2.csv",
                            environ=slurm_profile, timeout=1500, log=tmp_path / "snakemake.log")
    assert res.returncode == 0, harness.tail(res.stdout + res.stderr)
    rows = (work / "results/reduced/tables/table2.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(f"MergeVQ ({VARIANT})")

    jobs = harness.sacct_jobs(since, work)
    by_rule: dict[str, list[dict]] = {}
    for job in jobs:
        by_rule.setdefault(harness.job_rule(job["comment"]), []).append(job)
    expected = {"train_ssl_teacher", "train_tokenizer", "demo_classifier", "reference_features", "evaluate_tokenizer"}
    assert expected <= set(by_rule), jobs
    assert "table" not in by_rule, jobs  # the table ran on the submitting node (localrule)
    gpu_rules = {"train_ssl_teacher", "train_tokenizer", "reference_features", "evaluate_tokenizer"}  # gpu/eval_rule
    for rule, rule_jobs in by_rule.items():
        assert rule_jobs[-1]["state"] == "COMPLETED", (rule, rule_jobs)
        gpus = re.search(r"gres/gpu=(\d+)", rule_jobs[-1]["tres"])
        if rule == "demo_classifier":  # cpu_rule: gpu 0
            assert gpus is None, rule_jobs
        elif rule in gpu_rules:  # gpu: 1 in the reduced config -> sbatch --gpus=1 -> one (fake) GPU allocated
            assert gpus and gpus.group(1) == "1", rule_jobs
    # the training rule's log names its SLURM job in its attempt header
    job_id = by_rule["train_tokenizer"][-1]["id"]
    log = (work / f"results/reduced/logs/train_tokenizer/{VARIANT}.log").read_text()
    assert f"SLURM job {job_id}" in log and "training complete" in log


# ---- preemption -------------------------------------------------------------------------------------
def _long_config(steps: int, runtime_min: int) -> dict:
    """The reduced config with one tokenizer training of `steps` steps, aligned to the EMA teacher
    (no teacher job to wait for), validated only at its end, checkpointed every 50 steps."""
    cfg = reduced_config()
    cfg["tokenizer"]["loss"]["teacher"] = "ema"
    cfg["tokenizer"]["variants"][VARIANT]["steps"] = steps
    cfg["tokenizer"]["train"].update(val_every=steps, ckpt_every=50)
    cfg["resources"]["gpu_rule"]["runtime"] = runtime_min
    return cfg


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}[{i}]")


def assert_same_weights(a: Path, b: Path) -> None:
    ta = dict(_tensors(torch.load(a, map_location="cpu", weights_only=False)))
    tb = dict(_tensors(torch.load(b, map_location="cpu", weights_only=False)))
    assert ta.keys() == tb.keys() and len(ta) > 10
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


class Reference:
    """One uninterrupted training (same config, one thread), run in the background while the
    SLURM tests run, and the step count sized from this machine's speed."""

    def __init__(self, root: Path):
        self.root = root
        # Speed: 15 steps of the same training, then size the run to ~170 s of training, so that
        # SLURM's time-limit warning (100-160 s into a 4-minute job) lands mid-training.
        probe_cfg = root / "probe.yaml"
        probe_cfg.write_text(yaml.safe_dump(_long_config(1000, 30), sort_keys=False))
        res = subprocess.run([MERGEVQ, "train-tokenizer", "--config", str(probe_cfg), "--variant", VARIANT,
                              "--out", str(root / "probe"), "--max-steps", "15"], env=harness.env(),
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        with open(root / "probe" / "metrics.csv", newline="") as fh:
            rates = [float(r["images_per_s"]) for r in csv.DictReader(fh)][1:]  # the first row includes start-up
        batch = reduced_config()["tokenizer"]["train"]["batch_size"]
        self.steps_per_s = sum(rates) / len(rates) / batch
        self.steps = int(min(5000, max(100, math.ceil(self.steps_per_s * 170 / 10) * 10)))
        self.config = root / "long.yaml"
        self.config.write_text(yaml.safe_dump(_long_config(self.steps, 30), sort_keys=False))
        self.proc = subprocess.Popen([MERGEVQ, "train-tokenizer", "--config", str(self.config), "--variant", VARIANT,
                                      "--out", str(root / "reference")], env=harness.env(),
                                     stdout=subprocess.DEVNULL, stderr=open(root / "reference.log", "w"))

    def model(self) -> Path:
        assert self.proc.wait(timeout=1800) == 0, (self.root / "reference.log").read_text()[-3000:]
        return self.root / "reference" / "model.pt"


@pytest.fixture(scope="module")
def reference(slurm_profile, tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference"))
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()


def _attempts(log: str, total: int) -> tuple[list[int], list[int]]:
    preempted = [int(s) for s in re.findall(r"preempted at step (\d+): checkpoint written, exiting 143", log)]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert preempted, log[-3000:]
    assert all(0 < s < total for s in preempted), (preempted, total)
    assert resumed == preempted, (preempted, resumed)  # each attempt resumes exactly where the last stopped
    assert log.count("requeued: it restarts under the same id") == len(preempted), log[-3000:]
    assert log.count("== attempt ") == len(preempted) + 1
    assert "training complete" in log
    return preempted, resumed


def _run_preempted(slurm_profile, tmp_path: Path, cfg: dict, scancel_after_step: int | None):
    work = tmp_path / "work"
    work.mkdir()
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    since = harness.now_for_sacct()
    target = f"results/reduced/tokenizer/{VARIANT}/model.pt"
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(work), "--configfile", str(cfg_path),
           "--profile", "slurm", *FAST_STATUS, target]
    out_log = tmp_path / "snakemake.log"
    with open(out_log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=work, env=slurm_profile, stdout=fh, stderr=subprocess.STDOUT)
        signalled = None
        try:
            if scancel_after_step is not None:
                metrics = work / f"results/reduced/tokenizer/{VARIANT}/metrics.csv"
                deadline = time.time() + 900
                while signalled is None:
                    assert proc.poll() is None, harness.tail(out_log.read_text())
                    assert time.time() < deadline, "training never reached the step to signal at"
                    job = harness.squeue_job(work, "train_tokenizer")
                    rows = metrics.read_text().splitlines()[1:] if metrics.exists() else []
                    if job and rows and int(rows[-1].split(",")[0]) >= scancel_after_step:
                        subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=60)
                        signalled = job
                    time.sleep(0.5)
            rc = proc.wait(timeout=1800)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=120)
    text = out_log.read_text()
    assert rc == 0, harness.tail(text)
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S+/rule_train_tokenizer/", text)
    assert len(submitted) == 1, text  # one submission: the requeues spent none of Snakemake's retries
    log = (work / f"results/reduced/logs/train_tokenizer/{VARIANT}.log").read_text()
    records = [r for r in harness.sacct_jobs(since, work, duplicates=True) if r["id"] == submitted[0]]
    return work, submitted[0], signalled, log, records


@pytest.mark.slurm
def test_scancel_term_checkpoints_requeues_and_resumes_exactly(slurm_profile, reference, tmp_path):
    cfg = yaml.safe_load(reference.config.read_text())
    work, job, signalled, log, records = _run_preempted(slurm_profile, tmp_path, cfg, scancel_after_step=10)
    assert signalled == job
    preempted, _ = _attempts(log, reference.steps)
    states = [r["state"] for r in records]
    assert states.count("REQUEUED") == len(preempted) and states[-1] == "COMPLETED", records
    print(f"\nscancel --signal=TERM: SLURM job {job}, {reference.steps} steps, preempted/resumed at {preempted}; "
          f"sacct: {[(r['state'], r['elapsed']) for r in records]}\n" +
          "\n".join(l for l in log.splitlines() if re.search(r"== attempt|preempted|requeued|resumed|complete", l)))
    assert_same_weights(work / f"results/reduced/tokenizer/{VARIANT}/model.pt", reference.model())


@pytest.mark.slurm
def test_time_limit_warning_checkpoints_requeues_and_resumes_exactly(slurm_profile, reference, tmp_path):
    """A 4-minute limit: the training rule's slurm_extra asks for SIGTERM 80 s ahead (resumable()),
    which SLURM sends 100-160 s into each attempt (start-up included); the run needs ~170 s of
    training, so the first attempt is warned mid-training, and a slow machine needs more attempts."""
    cfg = yaml.safe_load(reference.config.read_text())
    cfg["resources"]["gpu_rule"]["runtime"] = 4
    work, job, _, log, records = _run_preempted(slurm_profile, tmp_path, cfg, scancel_after_step=None)
    preempted, _ = _attempts(log, reference.steps)
    requeued = [r for r in records if r["state"] == "REQUEUED"]
    assert len(requeued) == len(preempted) and records[-1]["state"] == "COMPLETED", records
    assert "TIMEOUT" not in {r["state"] for r in records}
    assert all(r["elapsed"] < "00:04:00" for r in requeued), records  # stopped before the limit, not at it
    print(f"\ntime-limit warning: SLURM job {job}, {reference.steps} steps, preempted/resumed at {preempted}; "
          f"sacct: {[(r['state'], r['elapsed']) for r in records]}\n" +
          "\n".join(l for l in log.splitlines() if re.search(r"== attempt|preempted|requeued|resumed|complete", l)))
    assert_same_weights(work / f"results/reduced/tokenizer/{VARIANT}/model.pt", reference.model())
