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
