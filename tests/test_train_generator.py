"""Stage-2 trainer: exact resume, refusals, telemetry, weight-decay groups, DDP (tiny CPU runs)."""
import os
import socket

import pytest
import torch
import yaml

from mergevq.files import load_checkpoint, torch_save, write_json
from mergevq.generator.codes import SHARD_FORMAT, CodeDataset, CodeShard, pack_shard
from mergevq.train.distributed import DistEnv

TINY_GPT = {"n_layer": 1, "n_head": 2, "dim": 32, "multiple_of": 16, "n_intra_layer": 1}


def write_codes(folder, split, n, seed, grid=4, bits=6, classes=10, augmentations=1):
    """A synthetic code set at K = L (owner = identity), as extract-codes writes it."""
    g = torch.Generator().manual_seed(seed)
    L = grid * grid
    shard = CodeShard(torch.randint(0, 2 ** bits, (n, augmentations, L), generator=g),
                      torch.arange(L).expand(n, augmentations, L).clone(), torch.randint(0, classes, (n,), generator=g))
    folder.mkdir(parents=True, exist_ok=True)
    torch_save(pack_shard(shard, {"synthetic": seed}), folder / f"{split}-00000.pt")
    write_json(folder / f"{split}.json", {
        "format": SHARD_FORMAT, "split": split, "kept": L, "tokens": L, "grid": grid, "bits": bits, "num_images": n,
        "augmentations": augmentations, "num_classes": classes, "variant": "G+R",
        "tokenizer": {"sha256": "0" * 64}, "shards": [{"file": f"{split}-00000.pt", "first": 0, "count": n}]})
    return folder / f"{split}.json"


def tiny_config(tmp_path, repo_root, **changes):
    cfg = yaml.safe_load((repo_root / "config" / "demo.yaml").read_text())
    cfg["generator"]["llamagen"].update(model_overrides=dict(TINY_GPT), batch_size=8, epochs=2, log_every=2,
                                        val_every=5, ckpt_every=3, warmup_steps=2, val_images=16)
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(cfg_path, codes, out, max_steps=None, dist=None, val=None):
    from mergevq.config import load_config
    from mergevq.train.generator import GeneratorStage, loop_config, resume_hash
    from mergevq.train.loop import fit

    cfg = load_config(cfg_path)
    torch.manual_seed(cfg["seed"])
    dist = dist or DistEnv()
    data = CodeDataset(codes)
    stage = GeneratorStage(cfg, "llamagen", "G+R", data, dist, CodeDataset(val) if val else None)
    loop = loop_config(stage.settings, stage.total_steps, cfg["seed"], max_steps, 0)
    return fit(stage, data, loop, out, cfg, resume_hash(cfg, "llamagen", data), dist), stage


@pytest.mark.parametrize("augmentations", [1, 2])  # 2: a stored flip is drawn per sample from the RNG
def test_exact_resume_bit_for_bit(tmp_path, repo_root, augmentations):
    cfg = tiny_config(tmp_path, repo_root)
    codes = write_codes(tmp_path / "codes", "train", 40, seed=0, augmentations=augmentations)
    val = write_codes(tmp_path / "codes", "val", 16, seed=1)
    code, stage = train(cfg, codes, tmp_path / "a", val=val)
    assert code == 0 and stage.total_steps == 10  # 2 epochs of 40 // 8 batches
    code, _ = train(cfg, codes, tmp_path / "b", max_steps=4, val=val)  # stops between checkpoints
    assert code == 0 and not (tmp_path / "b" / "model.pt").exists()
    code, _ = train(cfg, codes, tmp_path / "b", val=val)
    assert code == 0
    a, b = (load_checkpoint(tmp_path / r / "model.pt", weights_only=False) for r in "ab")
    assert a["generator_config"] == b["generator_config"] and a["generator_config"]["codebook_bits"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the weights moved, so the equality is not between two copies of the initialisation
    from mergevq.generator import generator_from_config

    torch.manual_seed(0)
    init = generator_from_config(a["generator_config"]).state_dict()
    assert any(not torch.equal(init[k], a["model"][k]) for k in init)
    # telemetry: loss per sub-token, tokens/s; validation CE per sub-token
    header = (tmp_path / "b" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "ce_1", "ce_2", "tokens_per_s", "lr", "grad_norm"} <= set(header)
    val_header = (tmp_path / "a" / "val.csv").read_text().splitlines()[0].split(",")
    assert {"val_loss", "val_ce_1", "val_ce_2"} <= set(val_header)


def test_sampling_loads_the_artifact(tmp_path, repo_root):
    from mergevq.eval.sampling import load_generator_artifact

    cfg = tiny_config(tmp_path, repo_root, **{"generator.llamagen.ema_decay": 0.9})
    codes = write_codes(tmp_path / "codes", "train", 40, seed=0)
    train(cfg, codes, tmp_path / "run")
    model, art = load_generator_artifact(tmp_path / "run" / "model.pt")
    assert not model.training and art["codes"]["tokens"] == 16
    for k, v in model.state_dict().items():  # the EMA weights are the ones sampled from
        assert torch.equal(v, art["ema"][k]), k


def test_refuses_changed_settings_and_other_codes(tmp_path, repo_root):
    from mergevq.train.checkpoint import CheckpointError

    cfg = tiny_config(tmp_path, repo_root)
    codes = write_codes(tmp_path / "codes", "train", 40, seed=0)
    train(cfg, codes, tmp_path / "run", max_steps=3)
    (tmp_path / "x").mkdir()
    changed = tiny_config(tmp_path / "x", repo_root, **{"generator.llamagen.lr": 5e-4})
    with pytest.raises(CheckpointError, match="config hash"):
        train(changed, codes, tmp_path / "run")
    with pytest.raises(ValueError, match="variant"):
        from mergevq.config import load_config
        from mergevq.train.generator import GeneratorStage

        data = CodeDataset(codes)
        data.manifest["variant"] = "G"
        GeneratorStage(load_config(cfg), "llamagen", "G+R", data, DistEnv())


def test_weight_decay_on_matrices_only():
    from mergevq.generator import build_generator
    from mergevq.train.generator import param_groups

    model = build_generator("llamagen-demo", **TINY_GPT)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert no_decay["params"]  # the RMSNorm weights


def test_batch_larger_than_the_codes_is_an_error(tmp_path, repo_root):
    from mergevq.config import ConfigError

    cfg = tiny_config(tmp_path, repo_root, **{"generator.llamagen.batch_size": 64})
    with pytest.raises(ConfigError, match="exceeds"):
        train(cfg, write_codes(tmp_path / "codes", "train", 40, seed=0), tmp_path / "run")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_path, codes, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = DistEnv.from_env(use_cuda=False)
    try:
        code, _ = train(cfg_path, codes, out, dist=dist)
        assert code == 0
    finally:
        dist.cleanup()


def test_ddp_two_processes_match_one_process(tmp_path, repo_root):
    # No dropout and no label dropping: those draw per-rank randomness, so the two runs would
    # legitimately differ; everything else (DDP's gradient all-reduce through LossModule) is exercised.
    cfg = tiny_config(tmp_path, repo_root, **{"generator.llamagen.dropout": 0.0, "generator.llamagen.class_dropout": 0.0,
                                              "generator.llamagen.epochs": 1, "generator.llamagen.lr": 1e-4})
    codes = write_codes(tmp_path / "codes", "train", 40, seed=0)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), cfg, codes, tmp_path / "ddp"), nprocs=2)
    train(cfg, codes, tmp_path / "single")
    ddp, single = (load_checkpoint(tmp_path / r / "model.pt", weights_only=False)["model"] for r in ("ddp", "single"))
    diff = sum(float((ddp[k].double() - single[k].double()).pow(2).sum()) for k in single) ** 0.5
    norm = sum(float(single[k].double().pow(2).sum()) for k in single) ** 0.5
    assert diff / norm < 1e-5, diff / norm
