"""The ``mergevq`` command line (also ``python -m mergevq``).

Each command lives in the module that owns its logic; that module defines
``add_arguments(parser)`` and ``run(args) -> int`` (``module:suffix`` names
``add_suffix_arguments`` / ``run_suffix`` for a module with several commands). Modules are imported only when their command
runs, so ``mergevq --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help). Commands of stages not built yet are absent, not stubbed.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate-config": ("mergevq.config_cli", "validate a config file (schema + semantic checks) and print it resolved"),
    "train-ssl-teacher": ("mergevq.train.ssl_teacher", "train the offline alignment teacher (SimCLR, no labels) for `teacher: ssl`"),
    "train-tokenizer": ("mergevq.train.tokenizer", "stage 1: train a MergeVQ tokenizer variant (resumable)"),
    "train-demo-classifier": ("mergevq.eval.demo_classifier", "train the demo's FID feature extractor on the digits"),
    "fid": ("mergevq.eval.fidelity", "FID between two folders of PNG images (and IS of the first), via torch-fidelity"),
    "evaluate": ("mergevq.eval.tokenizer_eval", "score a tokenizer at a kept count: PSNR/SSIM/LPIPS, rFID (S and S-hat), source accuracy, usage, MACs"),
    "reference-features": ("mergevq.eval.tokenizer_eval:reference", "features of the validation originals under the FID extractor (computed once per run)"),
    "linear-probe": ("mergevq.eval.probe_cli", "linear probe (BN + linear) on frozen encoder features, a random-init encoder or raw pixels"),
    "finetune": ("mergevq.eval.finetune", "end-to-end fine-tuning of a tokenizer's encoder with a classification head"),
    "table": ("mergevq.report.tables", "build a reproduced table (ours beside the paper's) as CSV + Markdown"),
    "figure": ("mergevq.report.figures", "draw one of the paper's figures from metrics or tokenizers"),
    "fetch-weights": ("mergevq.weights", "download the pretrained weight files named in a config (needs internet)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergevq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    args = cmd_parser.parse_args(argv[1:])
    from mergevq.config import ConfigError

    try:
        return int(run(args) or 0)
    except ConfigError as exc:
        print(f"mergevq {name}: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
