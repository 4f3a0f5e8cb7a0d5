"""``mergevq validate-config``: check a config and print the resolved object."""
from __future__ import annotations

import argparse

import yaml

from mergevq.config import config_hash, load_config, save_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. seed=1")
    parser.add_argument("--out", help="also write the resolved config here (atomically)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    if args.out:
        save_config(cfg, args.out)
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
    print(f"# config hash {config_hash(cfg)}")
    return 0
