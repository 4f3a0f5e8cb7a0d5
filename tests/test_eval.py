"""mergevq.eval: FID/IS through torch-fidelity, demo extractor, PSNR/SSIM/LPIPS, MACs, linear probe."""
import argparse
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from mergevq.eval import demo_classifier as dc
from mergevq.eval import fidelity as fd
from mergevq.eval.flops import count_macs, macs_by_module
from mergevq.eval.linear_probe import train_linear_probe
from mergevq.eval.reconstruction import LPIPS, psnr, ssim


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------
# Helpers: a reference Fréchet distance, a toy extractor with known outputs
# ---------------------------------------------------------------------------------------------
def scipy_fid(f1: torch.Tensor, f2: torch.Tensor) -> float:
    a, b = f1.double().numpy(), f2.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


TOY = "mergevq-test-toy"
TOY_CLASSES = 4


class ToyExtractor(FeatureExtractorBase):
    """FID feature "3": channel means. IS logits: pixel[1,0,0] * onehot(pixel[0,0,0] % 4)."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("3", "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "3", "isc": "logits_unbiased"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)

    def forward(self, x):
        logits = F.one_hot(x[:, 0, 0, 0].long() % TOY_CLASSES, TOY_CLASSES).double() * x[:, 1, 0, 0, None].double()
        out = {"3": x.float().mean(dim=(2, 3)), "logits_unbiased": logits.float()}
        return tuple(out[n] for n in self.features_list)


if TOY not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(TOY, ToyExtractor)


@pytest.fixture
def toy_weights(tmp_path):
    path = tmp_path / "toy.bin"  # the toy has no weights; fid_is still insists on a file (and hashes it)
    path.write_bytes(b"toy")
    return path


def random_images(n, seed, size=32, high=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, 3, size, size), dtype=torch.uint8, generator=g)


def colour_images(n, seed, high=256):
    """32x32 images of one random colour each, plus a little noise: features vary from image to image."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.randint(0, high, (n, 3, 1, 1), generator=g)
    return (colour + torch.randint(0, 16, (n, 3, 32, 32), generator=g)).clamp(0, 255).to(torch.uint8)


@pytest.fixture
def demo_weights(tmp_path):
    """A tiny untrained demo classifier saved to tmp.

    Its BatchNorm statistics are calibrated on random colour images (no training step): with the
    initial running stats, default-initialised convs shrink activations ~3x per layer and every
    image would get nearly the same features.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = dc.DemoClassifier(dc.DemoClassifierConfig(feature_dim=8, width=4))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the running stats become the calibration batch's
    with torch.no_grad():
        model.train()(dc.uint8_to_input(colour_images(256, 99), 32))
    model.eval()
    path = tmp_path / "demo.pt"
    dc.save_demo_classifier(model, path)
    return path


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    return folder


# ---------------------------------------------------------------------------------------------
# FID / IS
# ---------------------------------------------------------------------------------------------
def test_fid_statistics_match_scipy_on_synthetic_features():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 16, generator=g)
    b = torch.randn(2000, 16, generator=g) @ (torch.eye(16) + 0.3 * torch.randn(16, 16, generator=g)) + 0.5
    ours = fd.frechet_distance(fd.statistics_from_features(a), fd.statistics_from_features(b))
    ref = scipy_fid(a, b)
    assert abs(ours - ref) / ref < 1e-6
    assert abs(fd.frechet_distance(fd.statistics_from_features(a), fd.statistics_from_features(a))) < 1e-9


def test_demo_classifier_fid_end_to_end_matches_scipy_and_torch_fidelity(demo_weights):
    import torch_fidelity

    a, b = colour_images(200, 0), colour_images(150, 1, high=128)
    result = fd.fid_is(a, b, extractor="demo-classifier", weights_path=demo_weights, batch_size=64)
    feats = {k: fd.extract_features(x, extractor="demo-classifier", weights_path=demo_weights, layers=["8"])["8"]
             for k, x in (("a", a), ("b", b))}
    ref = scipy_fid(feats["a"], feats["b"])
    assert ref > 1e-2
    assert abs(result["fid"] - ref) / ref < 1e-6
    direct = torch_fidelity.calculate_metrics(
        input1=fd.UInt8ImageDataset(a), input2=fd.UInt8ImageDataset(b), fid=True, isc=True, cuda=False,
        feature_extractor="demo-classifier", feature_extractor_weights_path=str(demo_weights),
        feature_layer_fid="8", cache=False, save_cpu_ram=True, verbose=False,
    )
    assert abs(result["fid"] - direct["frechet_inception_distance"]) / ref < 1e-5
    assert result["is"] == pytest.approx(direct["inception_score_mean"], rel=1e-9)
    p = result["protocol"]
    assert p["extractor"] == "demo-classifier" and p["feature_layer"] == "8"
    assert p["weights_sha256"] == fd.sha256_file(demo_weights)
    assert (p["num_images"], p["reference_num_images"], p["resolution"]) == (200, 150, [32, 32])
    assert p["smoke"] is True and p["image_format"] == "uint8-tensor"
    same = fd.fid_is(a, a, extractor="demo-classifier", weights_path=demo_weights, isc=False)
    assert abs(same["fid"]) < 1e-6 and same["is"] is None


def test_inception_score_known_cases(toy_weights):
    n = 2000
    images = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % TOY_CLASSES  # evenly spread over the classes
    uniform = fd.fid_is(images, images, extractor=TOY, weights_path=toy_weights)
    assert uniform["is"] == pytest.approx(1.0, abs=1e-9)  # logits all 0: every prediction is uniform
    images[:, 1, 0, 0] = 255  # logits 255 * onehot: perfectly confident
    confident = fd.fid_is(images, images, extractor=TOY, weights_path=toy_weights)
    # IS = exp(entropy of the class histogram of each split), just below C for 200-image splits
    assert TOY_CLASSES - 0.1 < confident["is"] <= TOY_CLASSES + 1e-9


def test_fid_against_stored_statistics_and_cache(tmp_path, toy_weights):
    a, b = random_images(300, 0, size=8), random_images(250, 1, size=8, high=200)
    kw = dict(extractor=TOY, weights_path=toy_weights, isc=False)
    plain = fd.fid_is(a, b, **kw)
    cached = fd.fid_is(a, b, cache_name="ref", cache_root=tmp_path / "cache", **kw)
    cache_file = tmp_path / "cache" / f"ref-{TOY}-3-{fd.sha256_file(toy_weights)[:16]}.npz"
    assert cached["protocol"]["reference_cache"] == str(cache_file) and cache_file.is_file()
    again = fd.fid_is(a, b, cache_name="ref", cache_root=tmp_path / "cache", **kw)  # read back, not recomputed
    assert plain["fid"] == pytest.approx(cached["fid"], rel=1e-12) == again["fid"]
    assert again["protocol"]["reference_sha256"] == plain["protocol"]["reference_sha256"]
    # our .npz, and an ADM-style file holding only float64 mu/sigma
    stats = fd.compute_statistics(b, extractor=TOY, weights_path=toy_weights)
    fd.save_statistics(tmp_path / "ours.npz", stats, {"extractor": TOY})
    np.savez(tmp_path / "adm.npz", mu=stats.mu, sigma=stats.sigma)
    for name in ("ours.npz", "adm.npz"):
        res = fd.fid_is(a, tmp_path / name, **kw)
        assert res["fid"] == pytest.approx(plain["fid"], rel=1e-12)
        assert res["protocol"]["reference_format"] == "statistics-npz"
    loaded, meta = fd.load_statistics(tmp_path / "ours.npz")
    assert (loaded.num_images, loaded.resolution, meta["extractor"]) == (250, (8, 8), TOY)
    with pytest.raises(fd.FidelityError, match="stale statistics cache"):
        fd.fid_is(a, b[:100], cache_name="ref", cache_root=tmp_path / "cache", **kw)
    with pytest.raises(fd.FidelityError, match="image sizes differ"):
        fd.fid_is(random_images(20, 2, size=16), tmp_path / "ours.npz", **kw)


def test_png_folders_and_cli(tmp_path, toy_weights, capsys):
    a, b = random_images(30, 0, size=8), random_images(25, 1, size=8, high=128)
    dir_a, dir_b = write_pngs(tmp_path / "a", a), write_pngs(tmp_path / "b" / "class0", b).parent
    from_tensors = fd.fid_is(a, b, extractor=TOY, weights_path=toy_weights)
    from_folders = fd.fid_is(dir_a, dir_b, extractor=TOY, weights_path=toy_weights)
    assert from_folders["fid"] == pytest.approx(from_tensors["fid"], rel=1e-9)
    assert from_folders["protocol"]["image_format"] == "png"

    parser = argparse.ArgumentParser()
    fd.add_arguments(parser)
    out = tmp_path / "fid.json"
    args = parser.parse_args([str(dir_a), str(dir_b), "--extractor", TOY, "--weights", str(toy_weights),
                              "--json", str(out), "--batch-size", "8"])
    assert fd.run(args) == 0
    assert json.loads(out.read_text())["fid"] == pytest.approx(from_tensors["fid"], rel=1e-9)
    Image.fromarray(a[0].permute(1, 2, 0).numpy()).save(dir_b / "x.jpg")
    with pytest.raises(fd.FidelityError, match="JPEG compression shifts FID"):
        fd.run(parser.parse_args([str(dir_a), str(dir_b), "--extractor", TOY, "--weights", str(toy_weights)]))
    # through the command line: one line naming the file, exit 1
    from mergevq.cli import main

    capsys.readouterr()
    assert main(["fid", str(dir_a), str(dir_b), "--extractor", TOY, "--weights", str(toy_weights)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergevq fid: error: ") and "x.jpg" in err[0]


def test_clear_errors(tmp_path, toy_weights, demo_weights):
    kw = dict(extractor=TOY, weights_path=toy_weights)
    a = random_images(10, 0, size=8)
    with pytest.raises(fd.FidelityError, match=r"image sizes differ: input1 \(8, 8\), input2 \(16, 16\)"):
        fd.fid_is(a, random_images(10, 1, size=16), **kw)
    with pytest.raises(fd.FidelityError, match=r"expected uint8 images in \[0, 255\], got torch.float32"):
        fd.fid_is(a.float() / 127.5 - 1, a, **kw)
    with pytest.raises(fd.FidelityError, match=r"values outside \[0, 255\] \(min 0, max 300\)"):
        fd.fid_is(a, torch.arange(10 * 3 * 8 * 8).reshape(10, 3, 8, 8) % 301, **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(fd.FidelityError, match="no PNG images"):
        fd.fid_is(tmp_path / "empty", a, **kw)
    jpeg_dir = write_pngs(tmp_path / "jpeg", a[:2])
    Image.fromarray(a[0].permute(1, 2, 0).numpy()).save(jpeg_dir / "z.jpeg")
    with pytest.raises(fd.FidelityError, match="JPEG compression shifts FID"):
        fd.fid_is(jpeg_dir, a, **kw)
    mixed = write_pngs(tmp_path / "mixed", a[:2])
    Image.fromarray(random_images(1, 3, size=16)[0].permute(1, 2, 0).numpy()).save(mixed / "big.png")
    with pytest.raises(fd.FidelityError, match="images of different sizes"):
        fd.fid_is(mixed, a, **kw)
    missing = tmp_path / "weights-inception.pth"
    with pytest.raises(fd.FidelityError, match=f"not found: {missing}; `mergevq fetch-weights` downloads it"):
        fd.fid_is(a, a, extractor="inception-v3-compat", weights_path=missing)
    with pytest.raises(fd.FidelityError, match="needs a local weights file"):
        fd.fid_is(a, a, extractor="inception-v3-compat", weights_path=None)
    with pytest.raises(fd.FidelityError, match="train-demo-classifier"):
        fd.fid_is(a, a, extractor="demo-classifier", weights_path=tmp_path / "nope.pt")
    fd.save_statistics(tmp_path / "five.npz", fd.statistics_from_features(torch.randn(50, 5)))
    with pytest.raises(fd.FidelityError, match="statistics of different feature sizes: 3 vs 5"):
        fd.fid_is(a, tmp_path / "five.npz", **kw)


# ---------------------------------------------------------------------------------------------
# Demo classifier
# ---------------------------------------------------------------------------------------------
def quadrant_digits(n, seed, size=16):
    """Separable toy 'digits': class k lights quadrant k of a dark image, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 60, (n, 3, size, size), generator=g)
    h = size // 2
    for k in range(4):
        r, c = divmod(k, 2)
        images[labels == k, :, r * h : (r + 1) * h, c * h : (c + 1) * h] += 180
    return images.clamp(0, 255).to(torch.uint8), labels


def test_demo_classifier_trains_saves_and_extracts(tmp_path):
    from torch_fidelity.utils import create_feature_extractor

    x, y = quadrant_digits(96, 0)  # 16 x 16 px: the network trains at its input size
    kw = dict(feature_dim=8, width=4, seed=1, batch_size=12, lr=1e-2, num_classes=4, progress=False)
    model = dc.train_demo_classifier(x, y, epochs=6, **kw)
    assert dc.classifier_accuracy(model, *quadrant_digits(64, 1)) > 0.9  # chance: 0.25
    once, twice = (dc.train_demo_classifier(x[:24], y[:24], epochs=1, **kw) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(once.state_dict().values(), twice.state_dict().values()))

    path = tmp_path / "demo.pt"
    sha = dc.save_demo_classifier(model, path)
    assert sha == fd.sha256_file(path)
    loaded = dc.load_demo_classifier(path, sha256=sha)
    with pytest.raises(ValueError, match="differs from the expected"):
        dc.load_demo_classifier(path, sha256="0" * 64)
    assert dc.read_demo_config(path) == model.config
    extractor = create_feature_extractor("demo-classifier", ["8", "logits_unbiased"], cuda=False,
                                         feature_extractor_weights_path=str(path), verbose=False)
    feats, logits = extractor(x[:5])
    with torch.no_grad():
        expected = loaded(dc.uint8_to_input(x[:5], 16))
    torch.testing.assert_close(feats, expected.features)
    torch.testing.assert_close(logits, expected.logits)
    big = F.interpolate(x[:2].float(), scale_factor=2, mode="nearest").to(torch.uint8)  # resized back to 16
    assert extractor(big)[0].shape == (2, 8)
    with pytest.raises(ValueError, match="not on the list"):
        create_feature_extractor("demo-classifier", ["64"], cuda=False, feature_extractor_weights_path=str(path))
    with pytest.raises(ValueError, match="uint8"):
        extractor(x[:2].float())


def test_random_shift_moves_content():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(16, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    shifted = dc.random_shift(x, 2, g)
    assert shifted.shape == x.shape and torch.equal(shifted.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    rows = shifted[:, 0].amax(dim=2).argmax(dim=1)
    assert rows.min() >= 2 and rows.max() <= 6 and len(rows.unique()) > 1
    assert torch.equal(dc.random_shift(x, 0, g), x)


# ---------------------------------------------------------------------------------------------
# PSNR, SSIM, LPIPS
# ---------------------------------------------------------------------------------------------
def test_psnr():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 1.6 - 0.8
    assert torch.isinf(psnr(x, x)).all()
    sign = torch.randint(0, 2, x.shape, generator=g) * 2 - 1
    y = x + 0.1 * sign  # |error| 0.1 on [-1, 1] = 0.05 on [0, 1]
    expected = -10 * math.log10(0.05**2)
    torch.testing.assert_close(psnr(x, y), torch.full((3,), expected), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(psnr((x + 1) / 2, (y + 1) / 2, value_range=(0.0, 1.0)), psnr(x, y))


def test_ssim_identity_and_direct_2d_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.equal(ssim(x, x), torch.ones(2))
    ours = ssim(x, y)
    assert (ours < 0.95).all() and (ours > 0).all()
    # direct formula with a 2-D window in float64 (scipy 'valid' correlation)
    from scipy.signal import correlate2d

    c = np.arange(11) - 5.0
    w1 = np.exp(-(c**2) / (2 * 1.5**2))
    w = np.outer(w1, w1) / w1.sum() ** 2
    a, b = ((x.double() + 1) / 2).numpy(), ((y.double() + 1) / 2).numpy()
    ref = []
    for i in range(2):
        per_channel = []
        for ch in range(3):
            f = lambda t: correlate2d(t, w, mode="valid")  # noqa: E731
            u, v = a[i, ch], b[i, ch]
            mu, mv = f(u), f(v)
            su, sv, suv = f(u * u) - mu**2, f(v * v) - mv**2, f(u * v) - mu * mv
            m = ((2 * mu * mv + 1e-4) * (2 * suv + 9e-4)) / ((mu**2 + mv**2 + 1e-4) * (su + sv + 9e-4))
            per_channel.append(m.mean())
        ref.append(np.mean(per_channel))
    torch.testing.assert_close(ours.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_lpips_loads_local_vgg16_trunk(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    # VGG16's `features` (the only part LPIPS uses) with torchvision's key names, random weights:
    # the same keys and shapes as vgg16(weights=None).state_dict() without its 120M-parameter classifier.
    torch.manual_seed(0)
    trunk = make_layers(cfgs["D"])
    state = {f"features.{k}": v for k, v in trunk.state_dict().items()}
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    lp = LPIPS(path)
    assert torch.equal(getattr(lp.lpips.net.slice3, "10").weight, state["features.10.weight"])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(lp(x, x), torch.zeros(2))
    d = lp(x, y)
    assert d.shape == (2,) and (d > 0).all()
    nn.Sequential(lp).train()
    assert not lp.training and torch.equal(lp(x, y), d)  # dropout stays off under a parent's .train()
    with pytest.raises(FileNotFoundError, match="mergevq fetch-weights"):
        LPIPS(tmp_path / "missing.pth")
    torch.save({"features.0.weight": state["features.0.weight"]}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16 state_dict"):
        LPIPS(tmp_path / "bad.pth")


# ---------------------------------------------------------------------------------------------
# MACs
# ---------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_count_macs(device):
    with torch.device(device):
        linear, conv = nn.Linear(64, 32), nn.Conv2d(3, 8, 3)
        x, img, q = torch.randn(8, 64), torch.randn(2, 3, 16, 16), torch.randn(2, 4, 16, 8)
    assert count_macs(linear, x) == 8 * 64 * 32
    assert count_macs(conv, img) == 2 * 8 * 14 * 14 * 3 * 3 * 3  # (B * C_out * H_out * W_out) * C_in * k * k
    assert count_macs(_Attention(), q) == 2 * (2 * 4 * 16 * 16 * 8)  # QK^T and AV
    with torch.device(device):
        net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    assert macs_by_module(net, x) == {"": 8 * 64 * 32 + 8 * 32 * 16, "0": 8 * 64 * 32, "2": 8 * 32 * 16}


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------
def test_linear_probe_beats_chance_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    def sample(n):
        y = torch.arange(n) % 4
        return centers[y] + torch.randn(n, 16, generator=g) * 5 + 10, y  # offset/scale: BN's job
    (tx, ty), (vx, vy) = sample(400), sample(200)
    kw = dict(num_classes=4, epochs=10, lr=1e-2, batch_size=100, weight_decay=0.0, seed=3, progress=False)
    result = train_linear_probe(tx, ty, vx, vy, **kw)
    assert result.top1 > 0.8 and result.train_top1 > 0.8  # chance is 0.25
    assert len(result.history) == 10 and result.history[-1]["val_top1"] == result.top1
    assert result.history[-1]["lr"] < 1e-4  # cosine reached ~0
    again = train_linear_probe(tx, ty, vx, vy, **kw)
    assert (again.top1, again.train_top1, again.history) == (result.top1, result.train_top1, result.history)
    assert torch.equal(again.val_correct, result.val_correct) and result.val_correct.shape == (200,)
    assert result.val_correct.float().mean().item() == result.top1


def test_bootstrap_intervals_cover_the_mean_and_pairing_cancels_shared_difficulty(monkeypatch):
    from mergevq.eval import bootstrap as bs
    from mergevq.eval.bootstrap import bootstrap_interval, paired_bootstrap, resampled_means
    rng = np.random.default_rng(0)
    hard = rng.random(400) < 0.3  # images both encoders get wrong
    a = (~hard) & (rng.random(400) < 0.95)
    b = a.copy()
    flip = np.flatnonzero(a)[:12]  # b misses 12 images that a gets right: a is better by 3 points
    b[flip] = False
    lo, hi = bootstrap_interval(a, seed=1)
    assert lo < a.mean() < hi and hi - lo < 0.15
    d, dlo, dhi = paired_bootstrap(a, b, seed=1)
    assert d == pytest.approx(12 / 400)
    assert 0 < dlo <= d <= dhi  # paired: the 3-point gain is resolved although the unpaired intervals overlap
    blo, bhi = bootstrap_interval(b, seed=1)
    assert blo < lo < bhi
    # chunked resampling (3 draws per chunk here) equals one (num, M) draw from the same generator
    monkeypatch.setattr(bs, "_CHUNK_ELEMENTS", 37 * 3)
    v = rng.random(37)
    direct = v[np.random.default_rng(5).integers(0, 37, (10, 37))].mean(axis=1)
    np.testing.assert_allclose(resampled_means(v, 10, 5), direct)
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(a, b[:-1])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])


# ---------------------------------------------------------------------------------------------
# rFID interval (bootstrap_fid) and streaming evaluation (mergevq evaluate)
# ---------------------------------------------------------------------------------------------
def test_fid_interval_brackets_the_estimate_and_resamples_match_torch_fidelity():
    from mergevq.eval import bootstrap as bs

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g)
    b = a + 0.5 * torch.randn(300, 8, generator=g) + 0.2  # paired "reconstructions"
    r = bs.bootstrap_fid(b, a, 300, seed=0, device="cpu")
    value = fd.frechet_distance(fd.statistics_from_features(b), fd.statistics_from_features(a))
    assert r.value == value and r.method == bs.FID_INTERVAL_METHOD and (r.level, r.resamples) == (0.95, 300)
    assert r.low < r.value < r.high
    # resampling with replacement inflates FID: the percentile interval would sit above the estimate
    assert r.resample_mean > r.value
    # [estimate - (q97.5 - m), estimate + (m - q2.5)]: draws 0..100 have m = 50, q = 2.5 and 97.5
    assert bs.expected_value_interval(40.0, np.arange(101.0)) == pytest.approx((-7.5, 87.5))
    # one resample, by multiplicity weights in torch, equals torch-fidelity on the materialised resample
    idx = torch.from_numpy(np.random.default_rng(7).integers(0, 300, 300))
    w = torch.bincount(idx, minlength=300).double()
    ours = bs._frechet(*bs._weighted_statistics(a.double(), w), *bs._weighted_statistics(b.double(), w))
    ref = fd.frechet_distance(fd.statistics_from_features(a[idx]), fd.statistics_from_features(b[idx]))
    assert ours == pytest.approx(ref, rel=1e-9)
    # a fixed reference (stored statistics, gFID): only the features are resampled
    fixed = bs.bootstrap_fid(b, fd.statistics_from_features(a), 100, seed=0, device="cpu")
    assert fixed.value == value and fixed.low < fixed.value < fixed.high
    assert bs.bootstrap_fid(b, a, 300, seed=0, device="cpu") == r  # seeded
    none = bs.bootstrap_fid(b, a, 0, seed=0, device="cpu")
    assert none.value == value and math.isnan(none.low) and math.isnan(none.high)
    assert set(r.as_dict()) == {"value", "ci_low", "ci_high", "ci_method", "ci_level", "resamples", "resample_mean"}
    with pytest.raises(fd.FidelityError, match="same shape"):
        bs.bootstrap_fid(b[:-1], a, 10, seed=0)


def test_feature_accumulator_equals_extract_features(demo_weights):
    images = colour_images(23, 3)
    layers = ["8", "logits_unbiased"]
    whole = fd.extract_features(images, extractor="demo-classifier", weights_path=demo_weights, layers=layers,
                                batch_size=64)
    acc = fd.FeatureAccumulator(fd.create_extractor("demo-classifier", demo_weights, layers))
    for i in range(0, 23, 5):
        acc.add(images[i:i + 5])
    streamed = acc.features()
    for name in layers:
        torch.testing.assert_close(streamed[name], whole[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(fd.FidelityError, match="expected uint8"):
        acc.add(images.float())


def test_streaming_evaluation_equals_in_memory(tmp_path, demo_weights, monkeypatch):
    """`mergevq evaluate` streams batches of 7 through 1 DataLoader worker; the same numbers come
    from all 24 images reconstructed, featurised and scored at once."""
    import dataclasses

    from mergevq.config import REPO_ROOT, load_config
    from mergevq.data.datasets import digits_arrays, to_uint8
    from mergevq.eval import tokenizer_eval as te
    from mergevq.eval.bootstrap import FID_INTERVAL_METHOD
    from mergevq.tokenizer import build_tokenizer
    from mergevq.tokenizer.lfq import codebook_usage
    from mergevq.tokenizer.recovery import canonical_source

    torch.manual_seed(0)
    tiny = dict(ch=8, num_res_blocks=1, dim=16, depth=2, heads=2, dec_ch=8, dec_num_res_blocks=1, dec_dim=16,
                dec_depth=1, dec_heads=2, rec_dim=16, rec_heads=2, rec_ffn=32)
    model = build_tokenizer("G+R-demo", **tiny).eval()
    path = tmp_path / "model.pt"
    torch.save({"variant": "G+R", "tokenizer_config": dataclasses.asdict(model.config), "ema": model.state_dict(),
                "model": model.state_dict(), "kept": 36, "step": 0}, path)
    cfg = load_config(REPO_ROOT / "config" / "demo.yaml", [
        "eval.fid.num_images=24", "eval.fid.batch_size=7", "eval.fid.bootstrap_resamples=50", "data.num_workers=1"])
    monkeypatch.setattr(te, "POSITION_BASELINE_IMAGES", 16)
    kept = 25

    reference = te.reference_features(cfg, demo_weights, progress=False)
    result = te.evaluate_tokenizer(cfg, path, kept, reference, demo_weights, device="cpu", progress=False)

    images, labels = digits_arrays(32, cfg["data"]["val_fraction"], cfg["seed"], "val")
    images, labels = images[:24], labels[:24]
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        out = model(x, kept)
        rec = {"gt": out.reconstruction.float().clamp(-1, 1),
               "pred": model.decode(out.quant.quantized, canonical_source(out.source_logits)).float().clamp(-1, 1)}
    layers = ["8", "logits_unbiased"]
    orig = fd.extract_features(images, extractor="demo-classifier", weights_path=demo_weights, layers=layers)
    torch.testing.assert_close(reference["features"]["8"], orig["8"], rtol=1e-5, atol=1e-6)
    assert torch.equal(reference["labels"], labels) and reference["num_images"] == 24
    for tag in ("gt", "pred"):
        feats = fd.extract_features(to_uint8(rec[tag]), extractor="demo-classifier", weights_path=demo_weights,
                                    layers=layers)
        fid = fd.frechet_distance(fd.statistics_from_features(feats["8"]), fd.statistics_from_features(orig["8"]))
        assert result[f"rfid_{tag}"]["value"] == pytest.approx(fid, rel=1e-4)
        assert result[f"psnr_{tag}"] == pytest.approx(psnr(rec[tag], x).mean().item(), rel=1e-5)
        assert result[f"ssim_{tag}"] == pytest.approx(ssim(rec[tag], x).mean().item(), rel=1e-5)
        top1 = (feats["logits_unbiased"].argmax(-1) == labels).float().mean().item()
        assert result[f"classifier_top1_recon_{tag}"] == pytest.approx(top1)
        cell = result[f"rfid_{tag}"]
        assert cell["ci_method"] == FID_INTERVAL_METHOD == result["fid_protocol"]["bootstrap"]["method"]
        assert cell["ci_low"] <= cell["value"] <= cell["ci_high"] and cell["resamples"] == 50
    owners = out.encoded.source.argmax(1)
    canonical = canonical_source(out.source_logits).argmax(1)
    assert result["source_accuracy"] == pytest.approx((canonical == owners).float().mean().item())
    assert result["source_accuracy_argmax"] == pytest.approx((out.source_logits.argmax(-1) == owners).float().mean().item())
    assert result["codebook_usage"] == pytest.approx(codebook_usage(out.quant.indices, model.config.bits).usage)
    assert result["tokens_per_image"] == kept and result["num_images"] == 24
    # the trainer's in-memory helpers see the same images
    held, held_labels = te.evaluation_images(cfg, "val", 24)
    assert torch.equal(held, images) and torch.equal(held_labels, labels)
    # a reference made from other images is refused
    with pytest.raises(ValueError, match="rerun `mergevq reference-features`"):
        te.evaluate_tokenizer(cfg, path, kept, {**reference, "num_images": 23}, demo_weights, device="cpu",
                              progress=False)
