"""The reduced demo config of the SLURM, report and targeted-rerun tests: config/demo.yaml with one
tokenizer variant (G+R, the one Fig. 4 and the generators use), two kept counts, and every training
cut to a few steps or one epoch, so the whole `all` DAG runs in a few minutes on 2 CPU cores.

Derived from config/demo.yaml at test time (not a checked-in copy), so it follows every schema
change of the demo config. The training rule class asks for one GPU (`resources.gpu_rule.gpu: 1`)
and so does evaluation, so a SLURM run submits them with `--gpus=1` as on a cluster (the test
cluster's GPUs are fake GRES devices; torch sees no CUDA and runs on the CPU).

    python tests/slurm/reduced_config.py > /tmp/reduced.yaml      # to run it by hand
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "config" / "demo.yaml"
VARIANT = "G+R"

# dotted path -> value, applied where the demo config has the key (a key the demo dropped is skipped).
OVERRIDES = {
    "run": "reduced",
    "tokenizer.train.log_every": 5,
    "tokenizer.train.val_every": 20,
    "tokenizer.train.val_images": 32,
    "tokenizer.train.ckpt_every": 20,
    "tokenizer.train.warmup_steps": 5,
    "tokenizer.loss.gan_start": 20,
    "tokenizer.ssl_teacher.steps": 10,
    "tokenizer.ssl_teacher.monitor_images": 200,
    f"tokenizer.variants.{VARIANT}.steps": 40,
    f"tokenizer.variants.{VARIANT}.sweep": [36, 16],
    "eval.fid.num_images": 64,
    "eval.fid.bootstrap_resamples": 20,
    "eval.demo_classifier.epochs": 1,
    "eval.linear_probe.epochs": 2,
    "eval.finetune.epochs": 1,
    "generator.sampling.cfg_scales": [1.0, 2.0],
    "generator.sampling.sweep_per_class": 2,
    "generator.sampling.num_per_class": 8,        # Fig. A2 shows 8 per class
    "generator.sampling.batch_size": 20,
    "resources.gpu_rule": {"gpu": 1, "mem_mb": 2000, "runtime": 10, "cpus_per_task": 1},
    "resources.eval_rule": {"gpu": 1, "mem_mb": 2000, "runtime": 10, "cpus_per_task": 1},
    "resources.cpu_rule": {"gpu": 0, "mem_mb": 1000, "runtime": 5, "cpus_per_task": 1},
}


def _set_if_present(cfg: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for key in parents:
        if not isinstance(node, dict) or key not in node:
            return
        node = node[key]
    if isinstance(node, dict) and leaf in node:
        node[leaf] = copy.deepcopy(value)


def _shrink_generators(cfg: dict) -> None:
    """Every generator training block (anything under `generator` with `epochs`): one epoch,
    logging, validation and checkpoints at its few steps."""
    for block in cfg.get("generator", {}).values():
        if isinstance(block, dict) and "epochs" in block:
            block["epochs"] = 1
            for key, value in (("log_every", 5), ("val_every", 20), ("ckpt_every", 20), ("warmup_steps", 2),
                               ("val_images", 32)):
                if key in block:
                    block[key] = value


def reduced_config(demo: dict | None = None) -> dict:
    cfg = copy.deepcopy(demo if demo is not None else yaml.safe_load(DEMO.read_text()))
    cfg["tokenizer"]["variants"] = {VARIANT: cfg["tokenizer"]["variants"][VARIANT]}
    for dotted, value in OVERRIDES.items():
        _set_if_present(cfg, dotted, value)
    _shrink_generators(cfg)
    return cfg


def write_reduced_config(path: str | Path, **overrides) -> Path:
    """Write the reduced config (plus `dotted.key=value` overrides given as keyword arguments with
    dots spelled as '__') to `path`."""
    cfg = reduced_config()
    for key, value in overrides.items():
        _set_if_present(cfg, key.replace("__", "."), value)
    path = Path(path)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


if __name__ == "__main__":
    yaml.safe_dump(reduced_config(), sys.stdout, sort_keys=False)
