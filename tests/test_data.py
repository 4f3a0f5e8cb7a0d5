import numpy as np
import pytest
import torch
from PIL import Image

from mergevq.data import DatasetError, build_dataset, digits_arrays
from mergevq.weights import MissingWeightsError, require_weight


def test_digits_split_is_fixed_and_disjoint():
    xtr, ytr = digits_arrays(32, 0.2, 0, "train")
    xva, yva = digits_arrays(32, 0.2, 0, "val")
    assert xtr.shape == (1437, 3, 32, 32) and xva.shape == (360, 3, 32, 32)
    assert xtr.dtype == torch.uint8 and set(ytr.tolist()) == set(range(10))
    # stratified: every class in val, roughly 20% each
    assert torch.bincount(yva).min() >= 30
    # no image appears in both splits
    tr = {bytes(x.numpy()) for x in xtr}
    assert not any(bytes(x.numpy()) in tr for x in xva[:50])
    again, _ = digits_arrays(32, 0.2, 0, "train")
    assert torch.equal(again, xtr)


def test_build_dataset_digits_range():
    cfg = {"seed": 0, "data": {"dataset": "digits", "resolution": 32, "val_fraction": 0.2}}
    img, label = build_dataset(cfg, "val")[0]
    assert img.shape == (3, 32, 32) and -1.0 <= img.min() and img.max() <= 1.0


def _tiny_imagefolder(root, broken=False):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    if broken:
        (root / "val" / "a" / "bad.JPEG").write_bytes(b"not an image")


def test_imagefolder_reads_and_reports_bad_files(tmp_path):
    _tiny_imagefolder(tmp_path, broken=True)
    cfg = {"seed": 0, "data": {"dataset": "imagefolder", "root": str(tmp_path), "resolution": 32}}
    ds = build_dataset(cfg, "train", transform="train")
    assert len(ds) == 4 and ds[0][0].shape == (3, 32, 32)
    val = build_dataset(cfg, "val")
    bad = [i for i, (p, _) in enumerate(val.samples) if p.name == "bad.JPEG"][0]
    with pytest.raises(DatasetError, match="bad.JPEG"):
        val[bad]
    with pytest.raises(DatasetError, match="dataset directory not found"):
        build_dataset({"seed": 0, "data": {"dataset": "imagefolder", "root": str(tmp_path / "nope"), "resolution": 32}}, "val")


def test_missing_weights_name_path_and_command(tmp_path):
    with pytest.raises(MissingWeightsError, match="fetch-weights"):
        require_weight({"weights": {"vgg16": None}}, "vgg16")
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "x.pth")):
        require_weight({"weights": {"vgg16": str(tmp_path / "x.pth")}}, "vgg16")
    (tmp_path / "x.pth").write_bytes(b"1")
    assert require_weight({"weights": {"vgg16": str(tmp_path / "x.pth")}}, "vgg16") == tmp_path / "x.pth"


# ---------------------------------------------------------------------------------------------
# Merge-ratio sampler: the authors' floor (generate_prob_list in model_mergevq.py)


def _authors_prob_list(n, distribution, mean=0.0, std=0.5, lambd=2.0, floor=0.0):
    """The authors' weights over candidate indices 0..n-1: kernel or density + floor, normalised."""
    i = np.arange(n)
    w = np.exp(-((i - mean) ** 2) / (2 * std**2)) if distribution == "gaussian" else lambd * np.exp(-lambd * i)
    w = w + floor
    return w / w.sum()


def test_sampler_floor_reproduces_the_authors_weights():
    from mergevq.data.merge_sampling import MergeRatioSampler

    # G+R's 'gaussian-6' candidates [121, ..., 256], centred on 144 (index 1), std 0.5, +0.05
    s = MergeRatioSampler("gaussian", k0=12, mu=0.0, sigma=0.5, k_min=121, k_max=256, floor=0.05)
    probs = s.probabilities()
    assert list(probs) == [121, 144, 169, 196, 225, 256]
    np.testing.assert_allclose(list(probs.values()), _authors_prob_list(6, "gaussian", mean=1, floor=0.05), rtol=1e-12)
    assert all(0.03 < probs[k] < 0.035 for k in (196, 225, 256))  # the tails are trained ~3% each
    # exponential: lam e^(-lam T) + 0.1
    e = MergeRatioSampler("exponential", k0=6, lam=2.0, k_min=36, k_max=100, floor=0.1)
    np.testing.assert_allclose(list(e.probabilities().values()), _authors_prob_list(5, "exponential", floor=0.1),
                               rtol=1e-12)
    # floor 0 is Eq. (19)/(20) alone: the tail is ~3e-4
    bare = MergeRatioSampler("gaussian", k0=12, mu=0.0, sigma=0.5, k_min=121, k_max=256).probabilities()
    assert bare[196] < 5e-4 and bare[144] > probs[144]


def test_sampler_floor_draws_and_errors():
    from mergevq.data.merge_sampling import MergeRatioSampler

    s = MergeRatioSampler.from_config(dict(distribution="gaussian", k0=12, mu=0.0, sigma=0.5, k_min=121,
                                           k_max=225, floor=0.05))
    n = 4000
    draws = [s.sample(t, 0) for t in range(n)]
    for k, p in s.probabilities().items():
        assert abs(draws.count(k) / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3
    with pytest.raises(ValueError, match="floor"):
        MergeRatioSampler("gaussian", k0=12, sigma=0.5, k_min=121, k_max=225, floor=-0.1)
