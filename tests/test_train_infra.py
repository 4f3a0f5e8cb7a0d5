"""Stage-1 training building blocks: merge-ratio sampling, discriminator and GAN losses, perceptual
and alignment losses, checkpoint / EMA / schedule / sampler / signal infrastructure."""
from __future__ import annotations

import math
import os
import signal
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mergevq.data.merge_sampling import MergeRatioSampler
from mergevq.losses import (DINOv2Teacher, EMASelfDistillation, PerceptualLoss, ProjectionHead,
                            alignment_loss)
from mergevq.tokenizer.discriminator import (LeCam, PatchGANDiscriminator, adaptive_generator_weight,
                                             generator_adversarial_loss, hinge_d_loss, hinge_g_loss,
                                             non_saturating_g_loss)
from mergevq.train.checkpoint import (CheckpointError, check_resumable, load_checkpoint, rng_state,
                                      save_checkpoint, set_rng_state)
from mergevq.train.distributed import DistEnv, ShardedSampler
from mergevq.train.ema import ModelEMA
from mergevq.train.runinfo import run_info
from mergevq.train.schedule import lr_lambda
from mergevq.train.signals import PreemptionHandler

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAPER = {  # tokenizer.variants.*.merge_sampling of config/config.yaml
    "G": dict(distribution="gaussian", k0=16, mu=0.0, sigma=1.0, k_min=225, k_max=400),
    "G+R": dict(distribution="gaussian", k0=12, mu=0.0, sigma=0.5, k_min=121, k_max=225),
    "R": dict(distribution="exponential", k0=6, lam=0.7, k_min=36, k_max=100),
}


# ---------------------------------------------------------------------------------------------
# Merge-ratio sampling (Eq. 19/20)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAPER))
def test_sampler_support_and_normalisation(name):
    s = MergeRatioSampler.from_config(PAPER[name])
    probs = s.probabilities()
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-12)
    assert list(probs) == s.support() == sorted(probs)
    for k in probs:
        assert s.k_min <= k <= s.k_max and math.isqrt(k) ** 2 == k


def test_sampler_shapes_match_fig5():
    assert MergeRatioSampler.from_config(PAPER["G+R"]).mode() == 144
    assert MergeRatioSampler.from_config(PAPER["G"]).mode() == 256
    r = MergeRatioSampler.from_config(PAPER["R"])
    p = list(r.probabilities().items())
    assert p[0][0] == 36 and all(a[1] > b[1] for a, b in zip(p, p[1:]))  # decreasing from k_min
    # Eq. (19) ratio between consecutive T is exp(-lam)
    assert math.isclose(p[1][1] / p[0][1], math.exp(-0.7), rel_tol=1e-9)


def test_sampler_deterministic_and_empirical():
    s = MergeRatioSampler.from_config(PAPER["G"])
    assert [s.sample(t, 3) for t in range(50)] == [s.sample(t, 3) for t in range(50)]
    assert [s.sample(t, 3) for t in range(50)] != [s.sample(t, 4) for t in range(50)]
    n = 8000
    counts = Counter(s.sample(t, 0) for t in range(n))
    assert set(counts) <= set(s.support())
    for k, p in s.probabilities().items():
        assert abs(counts.get(k, 0) / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3


def test_sampler_fixed_and_invalid():
    assert MergeRatioSampler("fixed", k0=12, k_min=121, k_max=225).probabilities() == {144: 1.0}
    with pytest.raises(ValueError, match="perfect square"):
        MergeRatioSampler("gaussian", k0=12, k_min=120, k_max=225)
    with pytest.raises(ValueError, match="no kept count"):
        MergeRatioSampler("exponential", k0=16, lam=1.0, k_min=100, k_max=225)  # T >= 0 gives K >= 256


# ---------------------------------------------------------------------------------------------
# Discriminator, hinge, LeCam, adaptive weight
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res,out,norm", [(32, 2, "group"), (256, 30, "batch")])
def test_patchgan_shape(res, out, norm):
    d = PatchGANDiscriminator(norm=norm)
    with torch.no_grad():
        y = d(torch.randn(2, 3, res, res))
    assert y.shape == (2, 1, out, out)
    conv_w = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, nn.Conv2d)])
    assert abs(conv_w.std().item() - 0.02) < 0.002


def test_hinge_losses_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - x) = [0, 0.5, 2] -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + x) = [0, 1, 2]   -> mean 1
    assert torch.isclose(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1)))
    assert torch.isclose(hinge_g_loss(fake), torch.tensor(1 / 3))


def test_non_saturating_generator_loss_value_and_gradient():
    fake = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    # softplus(-x) = log(1 + e^-x): [log(1 + e^2), log 2, log(1 + e^-3)]
    expected = (math.log1p(math.exp(2.0)) + math.log(2.0) + math.log1p(math.exp(-3.0))) / 3
    loss = non_saturating_g_loss(fake)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    (grad,) = torch.autograd.grad(loss, fake)
    # d/dx softplus(-x) / n = -sigmoid(-x) / n: large where D rejects the fake, ~0 where it is fooled
    sig = [1 / (1 + math.exp(-v)) for v in (2.0, 0.0, -3.0)]
    torch.testing.assert_close(grad, -torch.tensor(sig) / 3)
    assert torch.equal(generator_adversarial_loss(fake, "non_saturating"), loss)
    assert torch.equal(generator_adversarial_loss(fake, "hinge"), hinge_g_loss(fake))
    with pytest.raises(ValueError, match="non_saturating"):
        generator_adversarial_loss(fake, "wgan")


def test_lecam_zero_when_matched_and_state_round_trip():
    lecam = LeCam(decay=0.9)
    lecam.ema_real.fill_(0.3)
    lecam.ema_fake.fill_(0.3)
    c = torch.full((4, 1, 2, 2), 0.3)
    assert lecam(c, c, update=False).item() == 0.0
    # update moves the anchors towards the batch means before the penalty is taken
    lecam2 = LeCam(decay=0.9)
    real, fake = torch.full((2, 1, 2, 2), 1.0), torch.full((2, 1, 2, 2), -1.0)
    val = lecam2(real, fake)
    assert torch.isclose(lecam2.ema_real, torch.tensor(0.1)) and torch.isclose(lecam2.ema_fake, torch.tensor(-0.1))
    assert torch.isclose(val, torch.tensor(1.1**2 + 1.1**2))
    lecam3 = LeCam(decay=0.9)
    lecam3.load_state_dict(lecam2.state_dict())
    assert lecam3.ema_real.item() == lecam2.ema_real.item() and lecam3.ema_fake.item() == lecam2.ema_fake.item()
    lecam2.eval()
    lecam2(real, fake)
    assert torch.isclose(lecam2.ema_real, torch.tensor(0.1))  # no update in eval mode


def test_adaptive_generator_weight():
    w = torch.nn.Parameter(torch.ones(3))
    nll, g = (w * 2.0).sum(), (w * 4.0).sum()
    out = adaptive_generator_weight(nll, g, w, factor=0.8)
    assert torch.isclose(out, torch.tensor(0.8 * 2 / (4 + 1e-4 / math.sqrt(3)) ), rtol=1e-3)
    assert not out.requires_grad


# ---------------------------------------------------------------------------------------------
# Perceptual and alignment losses
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    from torchvision.models.vgg import cfgs, make_layers

    # torchvision.models.vgg16(weights=None).features, built without the 120M-parameter classifier:
    # the trunk is all LPIPS reads (the real file's classifier keys are ignored).
    features = make_layers(cfgs["D"])
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path, features[0].weight.detach().clone()


def test_perceptual_loss_loads_local_trunk(vgg16_file):
    path, first_conv = vgg16_file
    loss = PerceptualLoss(path)
    assert torch.equal(loss.lpips.net.slice1[0].weight, first_conv)
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.training
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == 0.0
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert loss(x, y).item() > 0 and loss(x, y, reduction="none").shape == (2,)


def test_perceptual_loss_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch-weights"):
        PerceptualLoss(None)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pth")):
        PerceptualLoss(tmp_path / "nope.pth")


def test_dinov2_teacher_loads_official_layout(tmp_path):
    """A DINOv2 checkpoint as facebookresearch ships it (518 px position grid, mask_token).
    A 2-block vit_small_patch14_dinov2 stands in for the 86M ViT-B to keep the test fast (same
    class and code path; only the size differs)."""
    import timm

    name, small = "vit_small_patch14_dinov2", {"depth": 2}
    src = timm.create_model(name, pretrained=False, num_classes=0, **small)  # default 518 px: 37x37 grid
    state = src.state_dict()
    state["mask_token"] = torch.zeros(1, src.embed_dim)
    path = tmp_path / "dinov2.pth"
    torch.save(state, path)
    teacher = DINOv2Teacher(path, model_name=name, img_size=224, model_kwargs=small)
    assert teacher.model.pos_embed.shape == (1, 16 * 16 + 1, src.embed_dim)
    assert torch.equal(teacher.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    out = teacher(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert out.shape == (1, src.embed_dim) and torch.isfinite(out).all()
    with pytest.raises(FileNotFoundError, match="fetch-weights"):
        DINOv2Teacher(tmp_path / "missing.pth", model_name=name)


def test_alignment_loss_is_cross_entropy_times_t_squared():
    s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    T = 4.0
    manual = -(F.softmax(t / T, -1) * F.log_softmax(s / T, -1)).sum(-1).mean() * T**2
    loss = alignment_loss(s, t, T)
    assert torch.isclose(loss, manual)
    # the authors' distill_cls_loss: kl_div(...) * T^2; CE = KL + H(teacher): same student gradient
    kl = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2
    ent = -(F.softmax(t / T, -1) * F.log_softmax(t / T, -1)).sum(-1).mean() * T**2
    assert torch.isclose(loss, kl + ent, atol=1e-5)
    (g_ours,) = torch.autograd.grad(loss, s)
    (g_kl,) = torch.autograd.grad(kl, s)
    assert torch.allclose(g_ours, g_kl, atol=1e-6)
    # Hinton et al.'s reason for T^2: for small logits the gradient, T (p_s - p_t) / B with
    # p_s - p_t ~ (s - t) / (T C), does not depend on T; without T^2 it would be 16x smaller at T = 4
    small_s, small_t = (0.01 * torch.randn(4, 10)).requires_grad_(), 0.01 * torch.randn(4, 10)
    (g4,) = torch.autograd.grad(alignment_loss(small_s, small_t, 4.0), small_s)
    (g1,) = torch.autograd.grad(alignment_loss(small_s, small_t, 1.0), small_s)
    assert (g4 - g1).norm() < 0.02 * g1.norm()


def test_ema_self_distillation():
    torch.manual_seed(0)
    student = ProjectionHead(8, 16, hidden_dim=32, bottleneck_dim=8)
    distill = EMASelfDistillation(student, out_dim=16, momentum=0.5, center_momentum=0.9)
    u, v = torch.randn(5, 8), torch.randn(5, 8)
    s, t = student(u), distill.teacher_forward(v)
    assert torch.allclose(t, student(v).detach())  # teacher starts as a copy
    loss = distill.loss(s, t)
    assert torch.allclose(distill.center, 0.1 * t.mean(0, keepdim=True))
    loss.backward()
    assert student.mlp[0].weight.grad is not None
    assert all(p.grad is None for p in distill.teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = distill.teacher.mlp[0].weight.clone()
    distill.update(student)
    assert torch.allclose(distill.teacher.mlp[0].weight, 0.5 * before + 0.5 * student.mlp[0].weight)
    other = EMASelfDistillation(ProjectionHead(8, 16, hidden_dim=32, bottleneck_dim=8), out_dim=16)
    other.load_state_dict(distill.state_dict())
    assert torch.equal(other.center, distill.center)
    assert torch.equal(other.teacher.mlp[0].weight, distill.teacher.mlp[0].weight)


# ---------------------------------------------------------------------------------------------
# Checkpoints, RNG, EMA, schedules
# ---------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_truncation_and_mismatch(tmp_path):
    path = tmp_path / "last.ckpt"
    state = {"model": {"w": torch.randn(300, 300)}, "step": 7, "variant": "G", "config_hash": "abc",
             "rng": rng_state()}
    save_checkpoint(state, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp files left
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["step"] == 7
    check_resumable(back, "G", "abc")
    with pytest.raises(CheckpointError, match="config hash"):
        check_resumable(back, "G", "def", path=path)
    with pytest.raises(CheckpointError, match="variant"):
        check_resumable(back, "R", "abc")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt checkpoint .*refusing to restart"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.ckpt")


def test_rng_state_round_trip(tmp_path):
    import random

    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.ckpt")
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path / "rng.ckpt")["rng"])
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_model_ema():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = ModelEMA(model, decay=0.9)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()(torch.randn(4, 3))  # moves BN running stats
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, 0.9 * w0 + 0.1 * model[0].weight)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    ema2 = ModelEMA(model, decay=0.9)
    ema2.load_state_dict(ema.state_dict())
    assert torch.equal(ema2.module[0].weight, ema.module[0].weight) and ema2.num_updates.item() == 1
    ema.train()
    assert not ema.module.training


def test_lr_schedules():
    step = lr_lambda("step", 100, milestones=[0.5, 0.75])
    assert [step(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = lr_lambda("cosine", 110, warmup_steps=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)
    assert lr_lambda("constant", 10)(5) == 1.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, step)
    sched.load_state_dict(sched.state_dict())  # a dataclass, so LambdaLR can record it
    with pytest.raises(ValueError):
        lr_lambda("poly", 10)


# ---------------------------------------------------------------------------------------------
# Distributed helpers, sampler, signals, run info
# ---------------------------------------------------------------------------------------------


def test_dist_env_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = DistEnv.from_env(use_cuda=False)
    assert env.is_main and not env.distributed and env.world_size == 1
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(env.all_reduce_mean(t), t) and env.any_rank(True) and not env.any_rank(False)
    env.barrier()
    env.cleanup()


@pytest.mark.parametrize("n,world", [(12, 3), (10, 4)])
def test_sharded_sampler_covers_each_epoch(n, world):
    samplers = [ShardedSampler(n, rank=r, world_size=world, seed=5) for r in range(world)]
    per_rank = math.ceil(2 * n / world)
    streams = [list(_take(s, per_rank)) for s in samplers]
    # interleave back into the global stream: position g belongs to rank g % world
    glob = [streams[g % world][g // world] for g in range(per_rank * world)]
    assert sorted(glob[:n]) == list(range(n)) and sorted(glob[n:2 * n]) == list(range(n))
    assert glob[:n] != list(range(n))  # shuffled
    assert glob[n:2 * n] != glob[:n]  # a new permutation each epoch
    if n % world == 0:
        from mergevq.train.distributed import epoch_permutation
        assert streams[1][: n // world] == list(epoch_permutation(n, 5, 0)[1::world])


def test_sharded_sampler_resume_is_exact():
    full = list(_take(ShardedSampler(10, rank=1, world_size=2, seed=1), 17))
    s = ShardedSampler(10, rank=1, world_size=2, seed=1)
    first = list(_take(s, 6))
    s.advance(6)
    state = s.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    resumed = ShardedSampler(10, rank=1, world_size=2, seed=1)
    resumed.load_state_dict(state)
    assert first + list(_take(resumed, 11)) == full
    with pytest.raises(ValueError, match="seed"):
        ShardedSampler(10, seed=2).load_state_dict(state)


def _take(it, n):
    it = iter(it)
    for _ in range(n):
        yield next(it)


def test_preemption_handler_sets_flag():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as h:
        assert not h.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert h.requested and h.signum == signal.SIGUSR1 and h.exit_code == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_run_info():
    info = run_info({"a": 1}, seed=3)
    assert info["seed"] == 3 and len(info["config_hash"]) == 16
    assert info["versions"]["torch"] == torch.__version__ and info["hostname"]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    env = DistEnv.from_env(use_cuda=False)
    try:
        lecam = LeCam(decay=0.5)
        lecam(torch.full((2, 1), 1.0 + 2 * rank), torch.full((2, 1), -1.0 - 2 * rank))  # means 1|3, -1|-3
        distill = EMASelfDistillation(nn.Identity(), out_dim=2, center_momentum=0.0)
        distill.loss(torch.zeros(1, 2), torch.tensor([[float(rank), 0.0]]))
        torch.save({"lecam": lecam.state_dict(), "center": distill.center, "any": env.any_rank(rank == 1)},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        env.cleanup()


def test_ddp_gloo_buffers_agree(tmp_path):
    """Two gloo ranks with different batches end with identical LeCam anchors and DINO centres."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported modules instead of re-importing torch (seconds each)
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    assert r0["lecam"]["ema_real"].item() == r1["lecam"]["ema_real"].item() == pytest.approx(0.5 * 2.0)
    assert r0["lecam"]["ema_fake"].item() == pytest.approx(0.5 * -2.0)
    assert torch.equal(r0["center"], r1["center"]) and r0["center"][0, 0].item() == pytest.approx(0.5)
    assert r0["any"] and r1["any"]
