"""The ``mergevq`` command line (also ``python -m mergevq``).

Each command lives in the module that owns its logic; that module defines
``add_arguments(parser)`` and ``run(args) -> int`` (``module:suffix`` names
``add_suffix_arguments`` / ``run_suffix`` for a module with several commands). Modules are imported only when their command
runs, so ``mergevq --help`` stays fast.

Expected failures (a bad config or argument, a missing or truncated file, a dataset that cannot be
read) print one line, ``mergevq <command>: error: <cause>``, and exit 2 for config/usage errors, 1
for the others; ``--debug`` (before or after the command) or ``MERGEVQ_DEBUG=1`` adds the traceback.
Anything else is a bug and raises with its traceback (``expected_exit_code`` draws the line).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

DEBUG_ENV = "MERGEVQ_DEBUG"
_PACKAGE_DIR = Path(__file__).resolve().parent

# command -> (module, one-line help). Commands of stages not built yet are absent, not stubbed.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate-config": ("mergevq.config_cli", "validate a config file (schema + semantic checks) and print it resolved"),
    "train-ssl-teacher": ("mergevq.train.ssl_teacher", "train the offline alignment teacher (SimCLR, no labels) for `teacher: ssl`"),
    "train-tokenizer": ("mergevq.train.tokenizer", "stage 1: train a MergeVQ tokenizer variant (resumable)"),
    "finetune-recovery": ("mergevq.train.recovery", "fine-tune Source Recovery on a frozen tokenizer (App. A.2, Table A2; resumable)"),
    "train-demo-classifier": ("mergevq.eval.demo_classifier", "train the demo's FID feature extractor on the digits"),
    "fid": ("mergevq.eval.fidelity", "FID between two folders of PNG images (and IS of the first), via torch-fidelity"),
    "evaluate": ("mergevq.eval.tokenizer_eval", "score a tokenizer at a kept count: PSNR/SSIM/LPIPS, rFID (S and S-hat), source accuracy, usage, MACs"),
    "reference-features": ("mergevq.eval.tokenizer_eval:reference", "features of the validation originals under the FID extractor (computed once per run)"),
    "linear-probe": ("mergevq.eval.probe_cli", "linear probe (BN + linear) on frozen encoder features, a random-init encoder or raw pixels"),
    "finetune": ("mergevq.eval.finetune", "end-to-end fine-tuning of a tokenizer's encoder with a classification head"),
    "extract-codes": ("mergevq.train.extract_codes", "stage 2: a frozen tokenizer's codes (K indices, owner of each position, label) of a split"),
    "train-generator": ("mergevq.train.generator", "stage 2: train a class-conditional generator on extracted codes (resumable)"),
    "sample": ("mergevq.eval.sampling", "class-conditional samples of a generator, decoded by its tokenizer (PNG + ADM .npz)"),
    "generation-metrics": ("mergevq.eval.generation", "gFID/IS of a sample folder; class consistency and memorisation on the demo"),
    "table": ("mergevq.report.tables", "build a reproduced table (ours beside the paper's) as CSV + Markdown"),
    "figure": ("mergevq.report.figures", "draw one of the paper's figures from metrics or tokenizers"),
    "fetch-weights": ("mergevq.weights", "download the pretrained weight files named in a config (needs internet)"),
    "check-quality": ("mergevq.report.quality", "compare a run's key numbers (PSNR, rFID, probe top-1, usage, class consistency) with the bounds in tests/quality_bounds.yaml"),
    "cluster-setup": ("mergevq.cluster", "install the project's SLURM profile as your `slurm` profile (account, partition; data/weights links)"),
    "bench": ("mergevq.bench", "efficiency figures as ratios (LFQ entropy, ToMe, MergeAR cache, training MFU, DAG no-op); see BENCHMARKS.md"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergevq", description=__doc__.splitlines()[0],
                                     epilog=f"--debug (or {DEBUG_ENV}=1) prints the traceback of an expected failure")
    parser.add_argument("--debug", action="store_true", help="tracebacks for expected failures too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def _raised_in_package(exc: BaseException) -> bool:
    """Whether the innermost frame of exc's traceback is a mergevq source file (one of our checks)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def expected_exit_code(exc: BaseException) -> int | None:
    """2 for a config or usage error, 1 for another expected failure, None for a bug.

    Expected: ConfigError (2); every exception class defined in mergevq (CheckpointError,
    DatasetError, FidelityError, ReportError, MissingWeightsError, TrainingDiverged, ...) and every
    OSError (a missing, unreadable or unwritable file) (1); a ValueError raised by mergevq's own
    code, i.e. one of its argument and input checks (1). A ValueError from inside torch, numpy or
    another library is a bug of ours until shown otherwise and keeps its traceback.
    """
    from mergevq.config import ConfigError

    if isinstance(exc, ConfigError):
        return 2
    if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] == "mergevq":
        return 1
    if isinstance(exc, ValueError) and _raised_in_package(exc):
        return 1
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    while argv and argv[0] == "--debug":  # the global flag, before the command
        debug = True
        argv.pop(0)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the unknown-command error and exits
        return 2
    name = argv[0]
    module_name, _, suffix = COMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name)
    add_arguments = getattr(module, f"add_{suffix}_arguments" if suffix else "add_arguments")
    run = getattr(module, f"run_{suffix}" if suffix else "run")
    cmd_parser = argparse.ArgumentParser(prog=f"mergevq {name}", description=COMMANDS[name][1])
    add_arguments(cmd_parser)
    cmd_parser.add_argument("--debug", action="store_true", help="tracebacks for expected failures too")
    args = cmd_parser.parse_args(argv[1:])
    debug = debug or args.debug
    try:
        return int(run(args) or 0)
    except Exception as exc:
        code = expected_exit_code(exc)
        if code is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"mergevq {name}: error: {_one_line(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
