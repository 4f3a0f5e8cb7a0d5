"""The offline alignment teacher (SimCLR): its loss, augmentations, exact resume, loading and errors."""
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from mergevq.config import ConfigError, load_config, parse_overrides
from mergevq.data.augment import random_affine, random_resized_crop
from mergevq.train.ssl_teacher import SSLTeacher, SSLTeacherNet, knn_top1, nt_xent_loss, teacher_artifact


def test_nt_xent_equals_a_per_row_loop():
    g = torch.Generator().manual_seed(0)
    z_u, z_v = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    tau = 0.3
    z = F.normalize(torch.cat([z_u, z_v]), dim=-1)
    losses = []
    for i in range(10):
        positive = (i + 5) % 10
        logits = torch.tensor([float(z[i] @ z[j]) / tau for j in range(10) if j != i])
        target = positive if positive < i else positive - 1  # index among the 9 others
        losses.append(-torch.log_softmax(logits, 0)[target])
    assert torch.isclose(nt_xent_loss(z_u, z_v, tau), torch.stack(losses).mean(), atol=1e-5)
    # identical views of well-separated embeddings: the positive wins outright
    assert nt_xent_loss(torch.eye(4) * 5, torch.eye(4) * 5, 0.05) < 1e-3
    with pytest.raises(ValueError, match="one shape"):
        nt_xent_loss(z_u, z_v[:4], tau)


def test_augmentations_keep_shape_and_reduce_to_identity():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.allclose(random_affine(x, degrees=0.0, translate=0.0), x, atol=1e-5)
    torch.manual_seed(0)
    assert torch.allclose(random_resized_crop(x, scale=(1.0, 1.0), flip=False), x, atol=1e-6)
    y = random_affine(random_resized_crop(x))
    assert y.shape == x.shape and not torch.allclose(y, x)
    torch.manual_seed(1)
    a = random_resized_crop(x)
    torch.manual_seed(1)
    assert torch.equal(random_resized_crop(x), a)  # the global RNG decides: checkpoints restore it


def test_knn_top1_on_separable_features():
    centers = torch.eye(3) * 4
    y = torch.arange(30) % 3
    g = torch.Generator().manual_seed(0)
    train = centers[y] + 0.1 * torch.randn(30, 3, generator=g)
    assert knn_top1(train, y, centers[y[:9]] + 0.1 * torch.randn(9, 3, generator=g), y[:9], k=5) == 1.0


def _tiny(tmp_path, repo_root, steps=4):
    cfg = yaml.safe_load((repo_root / "config" / "demo.yaml").read_text())
    cfg["tokenizer"]["ssl_teacher"].update(steps=steps, batch_size=8, monitor_images=40)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg_path, out, max_steps=None):
    import argparse

    from mergevq.train import ssl_teacher

    return ssl_teacher.run(argparse.Namespace(config=str(cfg_path), out=str(out), max_steps=max_steps, set=[]))


def test_exact_resume_and_the_frozen_teacher_loads(tmp_path, repo_root):
    cfg = _tiny(tmp_path, repo_root)
    assert _train(cfg, tmp_path / "a") == 0
    assert _train(cfg, tmp_path / "b", max_steps=2) == 0 and not (tmp_path / "b" / "model.pt").exists()
    assert _train(cfg, tmp_path / "b") == 0
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=False)["trunk"] for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    val = (tmp_path / "a" / "val.csv").read_text().splitlines()
    assert val[0] == "step,knn_top1" and 0.0 <= float(val[-1].split(",")[1]) <= 1.0

    teacher = SSLTeacher(tmp_path / "a" / "model.pt")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = teacher(x)
    assert out.shape == (2, teacher.embed_dim) == (2, 64) and not out.requires_grad
    teacher.train()  # frozen BatchNorm: training mode elsewhere never reaches it
    assert not teacher.trunk.training and torch.equal(teacher(x), out)
    assert teacher(F.interpolate(x, size=64)).shape == (2, 64)  # other sizes are resized


def test_teacher_errors_name_the_cause(tmp_path, repo_root):
    with pytest.raises(FileNotFoundError, match="train-ssl-teacher"):
        SSLTeacher(tmp_path / "missing.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an SSL teacher"):
        SSLTeacher(tmp_path / "other.pt")
    torch.save(teacher_artifact(SSLTeacherNet()), tmp_path / "ok.pt")
    SSLTeacher(tmp_path / "ok.pt")
    # the tokenizer needs the file when the config aligns to it
    from mergevq.train.distributed import DistEnv
    from mergevq.train.tokenizer import TokenizerStage

    cfg = load_config(repo_root / "config" / "demo.yaml")
    with pytest.raises(ConfigError, match="--teacher"):
        TokenizerStage(cfg, "R", DistEnv())
    # and the config needs the teacher's settings
    raw = yaml.safe_load((repo_root / "config" / "demo.yaml").read_text())
    del raw["tokenizer"]["ssl_teacher"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="tokenizer.ssl_teacher"):
        load_config(tmp_path / "c.yaml")


def test_overrides_read_exponents_without_a_dot_as_numbers():
    assert parse_overrides(["a.lr=2e-3", "b=1", "c=x", "d=nan"]) == {"a": {"lr": 2e-3}, "b": 1, "c": "x", "d": "nan"}
    assert math.isclose(parse_overrides(["lr=1E-4"])["lr"], 1e-4)
