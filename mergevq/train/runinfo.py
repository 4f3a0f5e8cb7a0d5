"""Provenance recorded next to every training run: code version, library versions, host, config."""
from __future__ import annotations

import datetime as _dt
import platform
import socket
import subprocess
import sys
from importlib import metadata

from mergevq.config import REPO_ROOT, config_hash


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run_info(cfg: dict, seed: int) -> dict:
    """A JSON-serialisable record: git commit (None outside a git checkout) and whether the tree had
    uncommitted changes, package versions, hostname, config hash, seed, UTC start time."""
    import torch

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git_commit": commit,
        "git_dirty": (bool(status) if status is not None else None),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "timm": _version("timm"),
            "mergevq": _version("mergevq"),
            "cuda": torch.version.cuda,
        },
        "hostname": socket.gethostname(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "argv": list(sys.argv),
        "config_hash": config_hash(cfg),
        "seed": int(seed),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
