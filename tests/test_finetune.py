"""Fine-tuning (mergevq.eval.finetune) and the linear-probe command (mergevq.eval.probe_cli)."""
import copy
import dataclasses
import json

import pytest
import torch
from torch.utils.data import Subset

from mergevq.config import load_config
from mergevq.data import build_dataset
from mergevq.eval import finetune, probe_cli
from mergevq.tokenizer import build_tokenizer

TINY = dict(ch=8, num_res_blocks=1, dim=16, depth=2, heads=2, dec_ch=8, dec_num_res_blocks=1, dec_dim=16,
            dec_depth=1, dec_heads=2, rec_dim=16, rec_heads=2, rec_ffn=32)
PROBE_KEYS = {"variant", "kept", "encoder", "features", "top1", "top1_ci", "train_top1", "epochs", "steps",
              "batch_size", "lr", "train_augment", "num_train", "num_val", "val_correct",
              "trained_for_kept"}
FINETUNE_KEYS = {"variant", "kept", "top1", "epochs", "num_train", "num_val", "lr", "layer_decay"}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread avoids OpenMP spin-waits on a shared 2-core box
    (measured 50x slower with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def demo_config(repo_root):
    return repo_root / "config" / "demo.yaml"


def tiny_tokenizer(seed=0):
    torch.manual_seed(seed)
    return build_tokenizer("G+R-demo", **TINY).eval()


@pytest.fixture
def tiny_artefact(tmp_path, demo_config):
    """A model.pt laid out like the trainer's artefact, with random weights."""
    model = tiny_tokenizer()
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    art = {"variant": "G+R", "preset": "G+R-demo", "tokenizer_config": dataclasses.asdict(model.config),
           "ema": ema, "model": model.state_dict(), "kept": 36, "tokens": 64,
           "config": load_config(demo_config), "config_hash": "0" * 16, "step": 0, "run": "demo"}
    path = tmp_path / "model.pt"
    torch.save(art, path)
    return path


def subsets(cfg, n_train=32, n_val=16):
    return (Subset(build_dataset(cfg, "train"), range(n_train)),
            Subset(build_dataset(cfg, "val"), range(n_val)))


@pytest.mark.parametrize("kind,dim", [("tokens_mean", 16), ("quantized_mean", 10), ("global", 16),
                                      ("raw_pixels", 3 * 32 * 32)])
def test_extract_features_shapes(demo_config, kind, dim):
    cfg = load_config(demo_config)
    data = Subset(build_dataset(cfg, "val"), range(10))
    feats = probe_cli.extract_features(tiny_tokenizer(), data, 36, kind, batch_size=4, device="cpu")
    assert feats.features.shape == (10, dim) and feats.features.dtype == torch.float32
    assert torch.equal(feats.labels, torch.stack([data[i][1] for i in range(10)]))
    if kind == "quantized_mean":  # mean of +-1 codes
        assert feats.features.abs().max() <= 1


def test_extract_features_rejects_unknown_kind(demo_config):
    cfg = load_config(demo_config)
    with pytest.raises(ValueError, match="unknown feature kind"):
        probe_cli.extract_features(tiny_tokenizer(), build_dataset(cfg, "val"), 36, "pixels", 4, "cpu")


def test_finetune_trains_encoder_and_is_deterministic(demo_config):
    cfg = load_config(demo_config, ["eval.finetune.epochs=1", "eval.finetune.batch_size=16"])
    train, val = subsets(cfg)
    results, weights = [], []
    for _ in range(2):
        model = tiny_tokenizer()
        before = copy.deepcopy(model.encoder.state_dict())
        out = finetune.finetune_encoder(model, cfg, kept=25, seed=0, device="cpu", train_set=train,
                                        val_set=val, progress=False)
        after = model.encoder.state_dict()
        assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
        assert not torch.equal(before["stem.conv_in.weight"], after["stem.conv_in.weight"])
        results.append(out)
        weights.append(after["blocks.1.mlp.fc1.weight"].clone())
    out = results[0]
    assert 0.0 <= out["top1"] <= 1.0
    assert (out["kept"], out["epochs"], out["num_train"], out["num_val"]) == (25, 1, 32, 16)
    assert len(out["history"]) == 1 and out["history"][0]["loss"] > 0
    assert results[0]["top1"] == results[1]["top1"] and torch.equal(weights[0], weights[1])


def test_finetune_mixup_path_runs(demo_config):
    """The ImageNet branch's Mixup/CutMix + SoftTargetCrossEntropy, on a digits subset."""
    cfg = load_config(demo_config, ["eval.finetune.epochs=1", "eval.finetune.batch_size=16",
                                    "eval.finetune.mixup=0.8", "eval.finetune.cutmix=1.0"])
    assert finetune.build_mixup(cfg["eval"]["finetune"], 10) is not None
    train, val = subsets(cfg, 16, 16)
    out = finetune.finetune_encoder(tiny_tokenizer(), cfg, kept=36, seed=0, device="cpu", train_set=train,
                                    val_set=val, progress=False)
    assert 0.0 <= out["top1"] <= 1.0


def test_build_mixup_off_for_demo(demo_config):
    assert finetune.build_mixup(load_config(demo_config)["eval"]["finetune"], 10) is None


def _run(module, argv):
    import argparse

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


@pytest.fixture
def small_splits(monkeypatch):
    """Only the first 64 train / 32 val digits reach the commands (CLI wiring tests stay fast)."""
    import mergevq.data

    full = mergevq.data.build_dataset

    def small(cfg, split, transform="eval"):
        return Subset(full(cfg, split, transform), range(64 if split == "train" else 32))

    monkeypatch.setattr(mergevq.data, "build_dataset", small)


def test_finetune_cli_writes_schema(tmp_path, demo_config, tiny_artefact, small_splits):
    out = tmp_path / "finetune" / "metrics.json"
    rc = _run(finetune, ["--config", str(demo_config), "--tokenizer", str(tiny_artefact), "--out", str(out),
                         "--kept", "16", "--device", "cpu", "--set", "eval.finetune.epochs=1",
                         "eval.finetune.batch_size=32"])
    metrics = json.loads(out.read_text())
    assert rc == 0 and set(metrics) == FINETUNE_KEYS
    assert metrics["variant"] == "G+R" and metrics["kept"] == 16 and metrics["epochs"] == 1
    assert (metrics["num_train"], metrics["num_val"]) == (64, 32)


def test_probe_cli_raw_pixels_well_above_chance(tmp_path, demo_config):
    out = tmp_path / "probe.json"
    rc = _run(probe_cli, ["--config", str(demo_config), "--raw-pixels", "--out", str(out), "--device", "cpu",
                          "--set", "eval.linear_probe.epochs=3"])
    metrics = json.loads(out.read_text())
    assert rc == 0 and set(metrics) == PROBE_KEYS
    assert metrics["encoder"] == "raw_pixels" and metrics["variant"] is None and metrics["kept"] is None
    assert (metrics["num_train"], metrics["num_val"], metrics["epochs"]) == (1437, 360, 3)
    assert metrics["top1"] > 0.7  # chance is 0.1
    assert len(metrics["val_correct"]) == 360 and sum(metrics["val_correct"]) / 360 == pytest.approx(metrics["top1"])
    assert metrics["top1_ci"][0] < metrics["top1"] < metrics["top1_ci"][1]


@pytest.mark.parametrize("features", ["tokens_mean", "global"])
def test_probe_cli_tokenizer(tmp_path, demo_config, tiny_artefact, small_splits, features):
    out = tmp_path / "probe.json"
    rc = _run(probe_cli, ["--config", str(demo_config), "--tokenizer", str(tiny_artefact), "--out", str(out),
                          "--device", "cpu", "--set", "eval.linear_probe.epochs=1",
                          f"eval.linear_probe.features={features}"])
    metrics = json.loads(out.read_text())
    assert rc == 0 and set(metrics) == PROBE_KEYS
    assert (metrics["variant"], metrics["kept"], metrics["encoder"], metrics["features"]) == (
        "G+R", 36, "trained", features)
    assert (metrics["num_train"], metrics["num_val"]) == (64, 32)
    assert 0.0 <= metrics["top1"] <= 1.0


def test_probe_cli_random_init(tmp_path, demo_config, small_splits):
    out = tmp_path / "probe.json"
    rc = _run(probe_cli, ["--config", str(demo_config), "--random-init", "G+R", "--kept", "25", "--out", str(out),
                          "--device", "cpu", "--set", "eval.linear_probe.epochs=1"])
    metrics = json.loads(out.read_text())
    assert rc == 0 and set(metrics) == PROBE_KEYS
    assert (metrics["variant"], metrics["kept"], metrics["encoder"], metrics["features"]) == (
        "G+R", 25, "random_init", "tokens_mean")


def test_random_init_matches_variant_architecture(demo_config):
    cfg = load_config(demo_config)
    a, b = probe_cli.random_init_tokenizer(cfg, "R", 0), probe_cli.random_init_tokenizer(cfg, "R", 0)
    assert a.config.name == "R-demo" and a.config.bits == 10 and a.config.kept == 9
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_finetune_imagefolder_timm_augmentation(tmp_path, repo_root):
    """The ImageNet branch: timm RandAugment/random-erasing transform + Mixup/CutMix on a tiny tree."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    cfg = load_config(repo_root / "config" / "config.yaml", [
        f"data.root={tmp_path}", "data.resolution=32", "data.num_classes=2", "data.num_workers=0",
        "eval.finetune.epochs=1", "eval.finetune.batch_size=4"])
    train, val = finetune.finetune_datasets(cfg)
    image, label = train[0]
    assert isinstance(train, finetune.TimmImageFolder) and image.shape == (3, 32, 32) and label == 0
    assert image.min() >= -1 - 1e-6 and image.max() <= 1 + 1e-6  # normalised to [-1, 1]
    out = finetune.finetune_encoder(tiny_tokenizer(), cfg, kept=36, seed=0, device="cpu", progress=False)
    assert (out["num_train"], out["num_val"]) == (8, 4) and 0.0 <= out["top1"] <= 1.0


@pytest.mark.parametrize("preset", ["G+R-demo", "R-demo"])
def test_layer_decay_groups_follow_simmim(preset):
    """lr scale decay ** (num_layers + 1 - layer_id): everything before block 0 (cls token,
    positional embedding, CNN stages or patch embedding, linear embedding) is layer 0, block i is
    i + 1, the final norm and the head num_layers + 1; every parameter sits in exactly one group."""
    torch.manual_seed(0)
    model = build_tokenizer(preset, **TINY)
    classifier = finetune.EncoderClassifier(model.encoder, num_classes=10, kept=16)
    depth, decay, lr = len(model.encoder.blocks), 0.65, 2e-3
    groups = finetune.parameter_groups(classifier, weight_decay=0.05, lr=lr, layer_decay=decay)
    owner = {id(p): g for g in groups for p in g["params"]}
    assert len(owner) == sum(len(g["params"]) for g in groups) == len(list(classifier.parameters()))
    expected_id = {"encoder.cls_token": 0, "encoder.pos_embed": 0, "encoder.stem": 0, "encoder.embed": 0,
                   "encoder.blocks.0": 1, f"encoder.blocks.{depth - 1}": depth, "encoder.norm": depth + 1,
                   "fc_norm": depth + 1, "head": depth + 1}
    seen = set()
    for name, p in classifier.named_parameters():
        group = owner[id(p)]
        assert group["lr_scale"] == pytest.approx(decay ** (depth + 1 - group["layer_id"]))
        assert group["lr"] == pytest.approx(lr * group["lr_scale"])
        assert group["weight_decay"] == (0.0 if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else 0.05)
        for prefix, lid in expected_id.items():
            if name == prefix or name.startswith(prefix + "."):
                assert group["layer_id"] == lid, name
                seen.add(prefix)
    present = {prefix for prefix in expected_id for name, _ in classifier.named_parameters()
               if name == prefix or name.startswith(prefix + ".")}
    assert seen == present and {"encoder.stem", "encoder.blocks.0", "head"} <= seen
    assert {g["layer_id"] for g in groups} == set(range(depth + 2))
    flat = finetune.parameter_groups(classifier, weight_decay=0.05, lr=lr, layer_decay=1.0)
    assert all(g["lr"] == lr for g in flat)


def test_finetune_lr_is_batch_scaled(demo_config, repo_root):
    paper = load_config(repo_root / "config" / "config.yaml")["eval"]["finetune"]
    assert finetune.peak_lr(paper) == pytest.approx(1.25e-3 * 1024 / 512)  # SimMIM ViT-B at batch 1024
    assert paper["layer_decay"] == 0.65
    demo = load_config(demo_config)["eval"]["finetune"]
    assert finetune.peak_lr(demo) == pytest.approx(1.5e-3) and demo["layer_decay"] == 1.0  # the demo's tuned lr
    cfg = load_config(demo_config, ["eval.finetune.epochs=1", "eval.finetune.batch_size=16",
                                    "eval.finetune.base_batch_size=32", "eval.finetune.layer_decay=0.5"])
    train, val = subsets(cfg, 16, 8)
    out = finetune.finetune_encoder(tiny_tokenizer(), cfg, kept=36, seed=0, device="cpu", train_set=train,
                                    val_set=val, progress=False)
    assert out["lr"] == pytest.approx(1.5e-3 * 16 / 32) and out["layer_decay"] == 0.5


def _tiny_imagefolder(root, per_class=(("train", 6), ("val", 2)), size=(40, 48)):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, n in per_class:
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (*size, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_probe_train_augmentation_on_imagefolder(tmp_path, repo_root, monkeypatch):
    """train_augment: MAE's random-resized crop + flip, a new view through the frozen encoder every
    epoch; validation and train_top1 on the centre crops."""
    _tiny_imagefolder(tmp_path / "data")
    model = tiny_tokenizer()
    monkeypatch.setattr(probe_cli, "random_init_tokenizer", lambda cfg, variant, seed: model)
    overrides = [f"data.root={tmp_path / 'data'}", "data.resolution=32", "data.num_classes=2", "data.num_workers=0",
                 "eval.linear_probe.epochs=2", "eval.linear_probe.batch_size=4", "eval.linear_probe.train_augment=true"]
    cfg = load_config(repo_root / "config" / "config.yaml", overrides)
    views = probe_cli.augmented_train_set(cfg)
    first = views[0][0]
    assert first.shape == (3, 32, 32) and first.min() >= -1 - 1e-6 and first.max() <= 1 + 1e-6
    assert not torch.equal(first, views[0][0])  # a new random crop each time it is read
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda images, kept: calls.append(len(images)) or encode(images, kept))
    out = tmp_path / "probe.json"
    rc = _run(probe_cli, ["--config", str(repo_root / "config" / "config.yaml"), "--random-init", "G+R",
                          "--kept", "25", "--out", str(out), "--device", "cpu", "--set", *overrides])
    metrics = json.loads(out.read_text())
    assert rc == 0 and set(metrics) == PROBE_KEYS and metrics["train_augment"] is True
    # 12 train + 4 val centre crops once, then 2 epochs x 3 batches of 4 augmented views
    assert sum(calls) == 12 + 4 + 2 * 12 and metrics["steps"] == 6
    assert 0.0 <= metrics["train_top1"] <= 1.0


def test_probe_train_augmentation_refused_on_digits(demo_config):
    from mergevq.config import ConfigError

    cfg = load_config(demo_config, ["eval.linear_probe.train_augment=true"])
    with pytest.raises(ConfigError, match="flipped or cropped digit"):
        probe_cli.augmented_train_set(cfg)
