"""Stage-1 trainer: exact resume, refusals, preemption, NaN guard, DDP equivalence (tiny CPU runs)."""
import math
import os
import signal
import socket

import pytest
import torch
import yaml

from mergevq.config import config_hash, load_config
from mergevq.train.checkpoint import CheckpointError, load_checkpoint
from mergevq.train.distributed import DistEnv
from mergevq.train.loop import LoopConfig, TrainingDiverged, fit

TINY = {"ch": 8, "num_res_blocks": 1, "depth": 2, "heads": 2, "dec_ch": 8, "dec_num_res_blocks": 1,
        "dec_depth": 1, "dec_heads": 2, "rec_dim": 16, "rec_heads": 2, "rec_ffn": 32}


def tiny_config(tmp_path, repo_root, **changes):
    cfg = yaml.safe_load((repo_root / "config" / "demo.yaml").read_text())
    cfg["tokenizer"]["variants"] = {"G+R": cfg["tokenizer"]["variants"]["G+R"]}
    var = cfg["tokenizer"]["variants"]["G+R"]
    var.update(steps=12, model_overrides=dict(TINY))
    cfg["tokenizer"]["train"].update(batch_size=4, log_every=2, val_every=1000, ckpt_every=3, warmup_steps=2, val_images=8)
    cfg["tokenizer"]["loss"].update(gan_start=4)
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def random_ssl_teacher(path):
    """A `teacher: ssl` artefact with random weights (the real one comes from train-ssl-teacher)."""
    from mergevq.train.ssl_teacher import SSLTeacherNet, teacher_artifact

    if not path.exists():
        with torch.random.fork_rng():
            torch.manual_seed(123)
            torch.save(teacher_artifact(SSLTeacherNet()), path)
    return path


def train(cfg_path, out, max_steps=None, dist=None):
    from mergevq.train.tokenizer import TokenizerStage
    from mergevq.data import build_dataset
    from mergevq.config import variant_config

    cfg = load_config(cfg_path)
    vc = variant_config(cfg, "G+R")
    torch.manual_seed(cfg["seed"])
    dist = dist or DistEnv()
    teacher = random_ssl_teacher(cfg_path.parent / "ssl_teacher.pt") if vc["loss"]["teacher"] == "ssl" else None
    stage = TokenizerStage(cfg, "G+R", dist, teacher_path=teacher)
    tr = vc["train"]
    loop = LoopConfig(vc["steps"], tr["batch_size"], cfg["seed"], tr["log_every"], tr["val_every"],
                      tr["ckpt_every"], max_steps=max_steps)
    return fit(stage, build_dataset(cfg, "train"), loop, out, cfg, config_hash(cfg), dist), stage


def weights(path):
    art = torch.load(path, map_location="cpu", weights_only=False)
    return art["model"], art["ema"]


@pytest.mark.parametrize("teacher", ["ssl", "ema"])  # a frozen teacher; a teacher with EMA state and a centre
def test_exact_resume_bit_for_bit(tmp_path, repo_root, teacher):
    cfg = tiny_config(tmp_path, repo_root, **{"tokenizer.loss.teacher": teacher})
    code, _ = train(cfg, tmp_path / "a")
    assert code == 0
    code, _ = train(cfg, tmp_path / "b", max_steps=5)  # stops between checkpoints: saves at stop
    assert code == 0 and not (tmp_path / "b" / "model.pt").exists()
    assert load_checkpoint(tmp_path / "b" / "last.ckpt", weights_only=False)["step"] == 5
    code, _ = train(cfg, tmp_path / "b")
    assert code == 0
    for a, b in zip(weights(tmp_path / "a" / "model.pt"), weights(tmp_path / "b" / "model.pt")):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # metrics were logged once per logging step, without duplicates from the resumed segment
    steps = [int(l.split(",")[0]) for l in (tmp_path / "b" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 12
    # a finished run is not retrained over
    code, _ = train(cfg, tmp_path / "a")
    assert code == 0


def test_refuses_changed_config_and_truncated_checkpoint(tmp_path, repo_root):
    cfg = tiny_config(tmp_path, repo_root)
    train(cfg, tmp_path / "run", max_steps=3)
    changed = tiny_config(tmp_path / "x" if (tmp_path / "x").mkdir() is None else None, repo_root,
                          **{"tokenizer.loss.entropy": 0.2})
    with pytest.raises(CheckpointError, match="config hash"):
        train(changed, tmp_path / "run")
    ckpt = tmp_path / "run" / "last.ckpt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(cfg, tmp_path / "run")
    assert ckpt.stat().st_size == len(data) // 2  # the evidence is left in place


def test_preemption_signal_checkpoints_and_exits_nonzero(tmp_path, repo_root, monkeypatch):
    from mergevq.train import tokenizer as stage_mod

    original = stage_mod.TokenizerStage.train_step

    def step_then_signal(self, batch, step):
        out = original(self, batch, step)
        if step == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(stage_mod.TokenizerStage, "train_step", step_then_signal)
    code, _ = train(tiny_config(tmp_path, repo_root), tmp_path / "run")
    assert code == 128 + signal.SIGUSR1
    assert load_checkpoint(tmp_path / "run" / "last.ckpt", weights_only=False)["step"] == 5
    assert not (tmp_path / "run" / "model.pt").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, repo_root, monkeypatch):
    from mergevq.train import tokenizer as stage_mod

    original = stage_mod.TokenizerStage.train_step

    def diverge(self, batch, step):
        out = original(self, batch, step)
        return {**out, "loss": math.nan} if step == 7 else out

    monkeypatch.setattr(stage_mod.TokenizerStage, "train_step", diverge)
    with pytest.raises(TrainingDiverged, match="step 7"):
        train(tiny_config(tmp_path, repo_root), tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "last.ckpt", weights_only=False)["step"] == 6


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_path, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = DistEnv.from_env(use_cuda=False)
    try:
        code, _ = train(cfg_path, out, dist=dist)
        assert code == 0
    finally:
        dist.cleanup()


def test_ddp_two_processes_match_one_process(tmp_path, repo_root):
    # No GAN term (PatchGAN BatchNorm cannot sync on CPU) and no EMA-teacher alignment (its random
    # views are drawn per rank); every other term, the LFQ entropy's all-reduce included, is on.
    # lr 1e-4 (Table A1's): Adam turns fp32 summation-order noise in near-zero gradients into
    # updates of size ~lr, so the agreement scales with lr.
    cfg = tiny_config(tmp_path, repo_root, **{"tokenizer.loss.gan": 0.0, "tokenizer.loss.align": 0.0,
                                              "tokenizer.variants.G+R.steps": 4, "tokenizer.train.lr": 1e-4})
    from mergevq.tokenizer import build_tokenizer

    torch.manual_seed(0)
    init = build_tokenizer("G+R-demo", bits=10, kept=36, entropy_group_bits=5, **TINY).state_dict()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), cfg, tmp_path / "ddp"), nprocs=2)
    train(cfg, tmp_path / "single")
    ddp, single = weights(tmp_path / "ddp" / "model.pt")[0], weights(tmp_path / "single" / "model.pt")[0]
    assert ddp.keys() == single.keys()
    # Relative to the whole weight vector: fp32 summation order differs between the all-reduced and
    # the single-process gradient (~1e-7), and Adam's normalisation turns that into up to ~1e-4 of
    # an individual near-zero-gradient entry, but the weights as a whole agree to < 1e-5.
    floats = [k for k in single if single[k].is_floating_point()]
    diff = sum(float((ddp[k].double() - single[k].double()).pow(2).sum()) for k in floats) ** 0.5
    norm = sum(float(single[k].double().pow(2).sum()) for k in floats) ** 0.5
    changed = sum(float((single[k].double() - init[k].double()).pow(2).sum()) for k in floats) ** 0.5
    print(f"DDP vs single: {diff / norm:.2e} of the weights; training moved them by {changed / norm:.2e}")
    assert diff / norm < 1e-5, diff / norm
    assert changed / norm > 1e-4  # the runs did train: the agreement is not between two copies of the init


def test_alignment_reads_the_configured_feature():
    from mergevq.tokenizer import build_tokenizer
    from mergevq.train.tokenizer import AlignBranch, align_feature

    torch.manual_seed(0)
    model = build_tokenizer("G+R-demo", bits=10, kept=36, entropy_group_bits=5, **TINY).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    enc = model.encode(x, 16)
    assert torch.equal(align_feature(enc, "cls"), enc.global_feature)
    assert torch.equal(align_feature(enc, "tokens_mean"), enc.hidden.mean(dim=1))
    with pytest.raises(ValueError, match="tokens_mean"):
        align_feature(enc, "patch")
    head = torch.nn.Linear(model.encoder.dim, 5)
    assert torch.allclose(AlignBranch(model.encoder, head, "tokens_mean")(x, 16), head(enc.hidden.mean(dim=1)))


def test_alignment_views_and_the_student_pass_kept_count():
    from mergevq.train.tokenizer import alignment_views, view_kept

    # the reconstruction's merge ratio at the view's token count
    assert view_kept(144, 256, 196) == 110 and view_kept(256, 1024, 784) == 196
    assert view_kept(36, 256, 196) == 28 and view_kept(36, 64, 49) == 28 and view_kept(9, 64, 49) == 7
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    v = alignment_views(x, 36, 64, 4, "separate", 28, (0.4, 1.0), flip=False)
    assert v.student.shape == v.teacher.shape == (3, 3, 28, 28) and v.kept == 28
    for b in range(3):  # the teacher's weak view: a plain 28-px window of the image
        assert any(torch.allclose(v.teacher[b], x[b, :, i:i + 28, j:j + 28]) for i in range(5) for j in range(5))
    assert not torch.allclose(v.student, v.teacher)  # independent views
    full = alignment_views(x, 36, 64, 4, "separate", None, (0.4, 1.0), flip=False)
    assert full.kept == 36 and torch.allclose(full.teacher, x)  # null resolution: the whole image
    rec = alignment_views(x, 25, 64, 4, "reconstruction", 28, (0.4, 1.0), flip=False)
    assert rec.student is x and rec.kept == 25 and rec.teacher.shape == x.shape
    with pytest.raises(ValueError, match="multiple of the encoder's downsampling factor 4"):
        alignment_views(x, 36, 64, 4, "separate", 30, (0.4, 1.0), flip=False)
    with pytest.raises(ValueError, match="align_student"):
        alignment_views(x, 36, 64, 4, "both", 28, (0.4, 1.0), flip=False)


def test_separate_student_pass_reads_its_own_view():
    from mergevq.tokenizer import build_tokenizer
    from mergevq.train.tokenizer import Student

    torch.manual_seed(0)
    model = build_tokenizer("G+R-demo", bits=10, kept=36, **TINY).eval()
    head = torch.nn.Linear(model.encoder.dim, 5)
    student = Student(model, head, "tokens_mean")
    x, view = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 28, 28) * 2 - 1
    out, logits = student(x, 36, align_images=view, align_kept=28)
    expected = head(model.encoder(view, 28, any_resolution=True).hidden.mean(dim=1))
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(out.reconstruction, model(x, 36).reconstruction)
    _, from_recon = student(x, 36)  # align_student: reconstruction
    torch.testing.assert_close(from_recon, head(out.encoded.hidden.mean(dim=1)))
    grads = torch.autograd.grad(logits.sum(), list(model.encoder.blocks.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_training_with_the_alternative_choices(tmp_path, repo_root):
    # the package's earlier behaviour, each kept as an option: hinge generator loss, the
    # sub-codebook entropy bound, the student feature from the reconstruction pass
    cfg = tiny_config(tmp_path, repo_root, **{"tokenizer.loss.gen_adv_loss": "hinge",
                                              "tokenizer.loss.codebook_entropy": "subcodebook",
                                              "tokenizer.loss.align_student": "reconstruction",
                                              "tokenizer.variants.G+R.steps": 6})
    code, stage = train(cfg, tmp_path / "run")
    assert code == 0
    assert stage.tokenizer.quantizer.codebook_entropy == "subcodebook"
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert math.isfinite(float(last[header.index("g_adv")])) and math.isfinite(float(last[header.index("align")]))
