"""The ``mergevq`` command line (also ``python -m mergevq``).

Each command lives in the module that owns its logic; that module defines
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their command
runs, so ``mergevq --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help). Commands of stages not built yet are absent, not stubbed.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate-config": ("mergevq.config_cli", "validate a config file (schema + semantic checks) and print it resolved"),
    "train-tokenizer": ("mergevq.train.tokenizer", "stage 1: train a MergeVQ tokenizer variant (resumable)"),
    "train-demo-classifier": ("mergevq.eval.demo_classifier", "train the demo's FID feature extractor on the digits"),
    "fid": ("mergevq.eval.fidelity", "FID between two folders of PNG images (and IS of the first), via torch-fidelity"),
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
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"mergevq {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    from mergevq.config import ConfigError

    try:
        return int(module.run(args) or 0)
    except ConfigError as exc:
        print(f"mergevq {name}: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
