"""Preemption: turn SIGTERM / SIGUSR1 into a flag the training loop polls between steps.

SLURM sends SIGTERM on preemption or scancel, and SIGUSR1 ahead of the time limit when the job
asks for it (`--signal=USR1@120`, via the profile's slurm_extra). The loop then writes its
checkpoint at the next step boundary and exits with `EXIT_CODE_BASE + signum` (143 for SIGTERM,
138 for SIGUSR1 on Linux), the shell's convention for "terminated by signal": the job is reported
failed, not complete, so Snakemake reruns it and the rerun resumes from the checkpoint. Under DDP
poll with `DistEnv.any_rank(handler.requested)` so all ranks stop at the same step.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

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
