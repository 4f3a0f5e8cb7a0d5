"""Preemption: turn SIGTERM / SIGUSR1 into a flag the training loop polls between steps.

SLURM sends SIGTERM on preemption and on `scancel --signal=TERM`, and ahead of the time limit
when the job asks for it: profiles/slurm sets `--signal=TERM@300` (TERM, not USR1: USR1 would also
kill the Snakemake job-step process around the trainer, whose default action for it is to exit).
The loop then writes its checkpoint at the next step boundary and exits with
`EXIT_CODE_BASE + signum` (143 for SIGTERM, 138 for SIGUSR1 on Linux), the shell's convention for
"terminated by signal". Inside a running SLURM batch job it first requeues the job
(`requeue_slurm_job`): SLURM restarts the same job id, whose rerun resumes from the checkpoint,
and Snakemake, which only sees the job pending again, spends none of its `retries`, so a training
longer than the time limit resumes any number of times. Elsewhere (a local run, an interactive
allocation, a job SLURM is cancelling) the non-zero exit makes Snakemake's retry resume it. Under
DDP poll with `DistEnv.any_rank(handler.requested)` so all ranks stop at the same step.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from types import FrameType
from typing import Callable, Mapping

EXIT_CODE_BASE = 128
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Context manager: while active, the given signals set `.requested` (and `.signum`) instead of
    killing the process; the previous handlers are restored on exit. A second signal of the same
    kind does not escalate: the checkpoint write must be allowed to finish."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.signum is None:
            self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the first signal received (143 for SIGTERM); 0 if none was received."""
        return EXIT_CODE_BASE + self.signum if self.signum is not None else 0

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be entered in the main thread (Python delivers signals there)")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()


def _scontrol(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)


def requeue_slurm_job(environ: Mapping[str, str] = os.environ,
                      scontrol: Callable[..., subprocess.CompletedProcess] | None = None) -> tuple[bool, str]:
    """Requeue the SLURM batch job this process runs in, after its checkpoint was written.

    Only a RUNNING batch job is requeued: a job SLURM is cancelling (plain `scancel`, a cancelled
    workflow) is COMPLETING/CANCELLED and must stay cancelled; an interactive allocation cannot be
    requeued. Returns (requeued, a line for the log). SLURM then ends this job's processes and
    starts the job again (after `cred_expire`, 2 min by default) under the same id.
    """
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return False, "not a SLURM job: exiting for Snakemake's retry to resume"
    if scontrol is None:
        if shutil.which("scontrol") is None:
            return False, f"SLURM job {job}: scontrol not found, not requeued"
        scontrol = _scontrol
    try:
        shown = scontrol("show", "job", "-o", job)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"SLURM job {job}: scontrol show job failed ({exc}), not requeued"
    fields = dict(kv.split("=", 1) for kv in shown.stdout.split() if "=" in kv)
    state, batch = fields.get("JobState", "?"), fields.get("BatchFlag", "1")
    if shown.returncode or state != "RUNNING":
        return False, f"SLURM job {job} is {state}: not requeued"
    if batch == "0":
        return False, f"SLURM job {job} is an interactive allocation: not requeued"
    try:
        done = scontrol("requeue", job)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"SLURM job {job}: scontrol requeue failed ({exc})"
    if done.returncode:
        return False, f"SLURM job {job}: scontrol requeue failed: {(done.stderr or done.stdout).strip()}"
    return True, f"SLURM job {job} requeued: it restarts under the same id and resumes from the checkpoint"
