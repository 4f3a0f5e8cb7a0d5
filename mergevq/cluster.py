"""`mergevq cluster-setup`: the one-time set-up after which `snakemake --profile slurm all` runs on a
SLURM cluster, typed as is.

Snakemake looks a bare profile name up in the working directory and then in the user's and the
site's config folders (``~/.config/snakemake/slurm/``, ``/etc/xdg/snakemake/slurm/``), the
convention for per-site settings such as the account. This command installs the project's
``profiles/slurm/config.yaml`` there with the account and partition filled in, and never replaces
an existing profile without asking (``--force`` in scripts). Optionally it points the paths that
``config/config.yaml`` names at where the data and weights live on this cluster, as symbolic links
(``data/imagenet`` -> ``--data-root``; each ``resources/weights/<file>`` -> ``--weights-dir/<file>``),
so the config, and the hashes every result is filed under, stay the same on every site.
"""
from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mergevq.config import REPO_ROOT, load_config

PROFILE_TEMPLATE = REPO_ROOT / "profiles" / "slurm" / "config.yaml"
PLACEHOLDERS = {"account": '"CHANGE_ME_account"', "partition": '"CHANGE_ME_partition"'}


class SetupError(RuntimeError):
    """The set-up cannot proceed; the message says what to change (`detail`: a diff to show)."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


def default_profile_dir() -> Path:
    """Where Snakemake finds `--profile slurm` for this user (appdirs' user config dir)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "snakemake" / "slurm"


def render_profile(account: str, partition: str, template: Path = PROFILE_TEMPLATE) -> str:
    """The project's profile with account and partition filled in (comments kept)."""
    text = template.read_text()
    for key, value in (("account", account), ("partition", partition)):
        if not value or any(c in value for c in "\"'\n \t"):
            raise SetupError(f"--{key} {value!r}: give a plain SLURM {key} name (no spaces or quotes)")
        if PLACEHOLDERS[key] not in text:
            raise SetupError(f"{template}: placeholder {PLACEHOLDERS[key]} not found; was the template edited?")
        text = text.replace(PLACEHOLDERS[key], f'"{value}"')
    header = (f"# Installed by `mergevq cluster-setup` from {template}.\n"
              "# Rerun that command to update it; edit here for settings of this site only.\n")
    return header + text


def install_profile(text: str, profile_dir: Path, force: bool, ask) -> str:
    """Write `text` as profile_dir/config.yaml; an existing different file is replaced only with
    `force` or when `ask` (a yes/no prompt, None when not interactive) says yes; kept as .bak."""
    target = profile_dir / "config.yaml"
    if target.exists():
        old = target.read_text()
        if old == text:
            return f"{target}: already installed, unchanged"
        diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(target), "new"))
        if not force:
            if ask is None or not ask(f"{target} exists and differs:\n{diff}\nReplace it (the old one is kept as "
                                      f"config.yaml.bak)? [y/N] "):
                raise SetupError(f"{target} exists and differs from the project's profile; not replaced. "
                                 "Rerun with --force to replace it (the old one is kept as config.yaml.bak), "
                                 "or merge by hand:", detail=diff)
        shutil.copy2(target, target.with_name("config.yaml.bak"))
    profile_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(".config.yaml.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
    return f"{target}: installed"


def link(path: Path, target: Path) -> str:
    """Make `path` a symbolic link to `target`; an existing link to the same target is fine,
    anything else at `path` is an error (never replaced)."""
    target = target.expanduser().resolve()
    if path.is_symlink():
        if path.resolve() == target:
            return f"{path} -> {target}: already linked"
        raise SetupError(f"{path} already links to {os.readlink(path)}, not {target}; remove the link to change it")
    if path.exists():
        raise SetupError(f"{path} already exists (not a link); move it aside to link it to {target}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return f"{path} -> {target}: linked"


def link_data(cfg: dict, data_root: Path) -> str:
    if not (data_root / "train").is_dir() or not (data_root / "val").is_dir():
        raise SetupError(f"--data-root {data_root}: needs train/<class>/ and val/<class>/ folders (ImageNet layout)")
    root = cfg["data"].get("root")
    if not root:
        raise SetupError("the config has no data.root to link (data.dataset is not imagefolder)")
    path = Path(root)
    return link(path if path.is_absolute() else REPO_ROOT / path, data_root)


def link_weights(cfg: dict, weights_dir: Path) -> list[str]:
    if not weights_dir.is_dir():
        raise SetupError(f"--weights-dir {weights_dir}: not a directory")
    out = []
    for key, value in cfg.get("weights", {}).items():
        if not value:
            continue
        path = Path(value) if Path(value).is_absolute() else REPO_ROOT / value
        source = weights_dir / path.name
        if not source.is_file():
            out.append(f"weights.{key}: {source} not found; run `mergevq fetch-weights` on a node with internet")
            continue
        out.append(link(path, source))
    return out


def check_partition(partition: str) -> str | None:
    """A warning when `sinfo` is here and does not know the partition (None when fine or unknown)."""
    if shutil.which("sinfo") is None:
        return None
    res = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%P"], capture_output=True, text=True)
    if res.returncode == 0 and not res.stdout.strip():
        return f"warning: sinfo knows no partition {partition!r} on this cluster (`sinfo -s` lists them)"
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--account", required=True, help="SLURM account (sbatch -A) to charge")
    p.add_argument("--partition", required=True, help="SLURM partition (sbatch -p) with GPUs")
    p.add_argument("--profile-dir", type=Path, default=None,
                   help="where to install the profile (default: ~/.config/snakemake/slurm, i.e. `--profile slurm`)")
    p.add_argument("--force", action="store_true", help="replace an existing different profile without asking")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "config" / "config.yaml",
                   help="config whose data.root / weights.* paths --data-root / --weights-dir fill (default: the paper's)")
    p.add_argument("--data-root", type=Path, help="ImageNet folder (train/, val/) to link at the config's data.root")
    p.add_argument("--weights-dir", type=Path, help="folder holding the weight files named in the config's weights: block")


def run(args: argparse.Namespace) -> int:
    def ask(question: str) -> bool:
        return input(question).strip().lower() in ("y", "yes")

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    try:
        lines = [install_profile(render_profile(args.account, args.partition), args.profile_dir or default_profile_dir(),
                                 args.force, ask if interactive else None)]
        if args.data_root or args.weights_dir:
            cfg = load_config(args.config)
            if args.data_root:
                lines.append(link_data(cfg, args.data_root))
            if args.weights_dir:
                lines += link_weights(cfg, args.weights_dir)
    except SetupError as exc:
        print(f"mergevq cluster-setup: error: {exc}", file=sys.stderr)
        if exc.detail:
            print(exc.detail, file=sys.stderr, end="")
        return 1
    warning = check_partition(args.partition)
    for line in lines + ([warning] if warning else []):
        print(line)
    print("next: snakemake --profile slurm all -n   (from the repository root; drop -n to run)")
    return 0
