"""Bad inputs fail early, through the `mergevq` command line, with one line naming the cause (file,
key, value), exit 2 for a config or usage error and 1 for a bad file or data, and leave nothing
partial: no declared output (model.pt, the metrics JSON), no temporary file. Grayscale, RGBA and
palette images are converted, not refused.

Each case runs the command in-process (`mergevq.cli.main`) on a tiny ImageFolder tree or on the
digits, so the whole file takes seconds.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
from reduced_config import VARIANT, reduced_config  # noqa: E402

from mergevq.cli import main  # noqa: E402


def make_folder(root: Path, classes=("c0", "c1"), n: int = 4, mode: str = "RGB", size=(40, 36)) -> Path:
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rgb = (np.random.default_rng(10 * c + i).random((size[1], size[0], 3)) * 255).astype(np.uint8)
            Image.fromarray(rgb).convert(mode).save(root / cls / f"{i}.png")
    return root


def image_tree(root: Path, **kw) -> Path:
    make_folder(root / "train", **kw)
    make_folder(root / "val", **kw)
    return root


def tiny_config(data_root: Path | None = None, **data) -> dict:
    """The reduced config, 8 training steps at batch 4, aligned to the EMA teacher (no teacher file);
    on an ImageFolder tree when `data_root` is given."""
    cfg = reduced_config()
    cfg["tokenizer"]["loss"]["teacher"] = "ema"
    cfg["tokenizer"]["variants"][VARIANT]["steps"] = 8
    cfg["tokenizer"]["train"].update(batch_size=4, val_images=4, log_every=1, warmup_steps=2, ckpt_every=4, val_every=8)
    cfg["eval"]["linear_probe"].update(epochs=1, batch_size=4)
    if data_root is not None:
        cfg["data"].update(dataset="imagefolder", root=str(data_root), num_classes=2)
        cfg["data"].pop("val_fraction", None)
    cfg["data"].update(data)
    return cfg


def write_config(tmp_path: Path, cfg: dict, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def mergevq(capsys, *argv: str) -> tuple[int, str]:
    """(exit code, stderr) of `mergevq ARGV...`."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    return code, capsys.readouterr().err


def error_line(err: str, command: str) -> str:
    """The one error line of a failed command. MERGEVQ_BAD_INPUTS_LOG=FILE appends each, after the
    test's name, to FILE (the list of bad inputs and their messages for a review)."""
    lines = re.findall(rf"mergevq {re.escape(command)}: error: [^\r\n]*", err)  # (a progress bar may precede it)
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    if os.environ.get("MERGEVQ_BAD_INPUTS_LOG"):
        with open(os.environ["MERGEVQ_BAD_INPUTS_LOG"], "a") as fh:
            fh.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{lines[0]}\n")
    return lines[0]


def assert_nothing_partial(results: Path, *declared: Path) -> None:
    for path in declared:
        assert not path.exists(), f"{path} was written by a failed command"
    leftovers = [p for p in results.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def raw_pixel_probe_fails(capsys, tmp_path, cfg: dict) -> str:
    """`mergevq linear-probe --raw-pixels` on `cfg` fails (exit 1) leaving nothing: its error line."""
    out = tmp_path / "results" / "probe.json"
    code, err = mergevq(capsys, "linear-probe", "--config", write_config(tmp_path, cfg), "--raw-pixels", "--out", str(out))
    assert code == 1, err[-2000:]
    line = error_line(err, "linear-probe")
    assert_nothing_partial(tmp_path, out)
    return line


def train(capsys, tmp_path, cfg: dict, out: Path, *extra: str) -> tuple[int, str]:
    return mergevq(capsys, "train-tokenizer", "--config", write_config(tmp_path, cfg), "--variant", VARIANT,
                   "--out", str(out), *extra)


# ---- data ---------------------------------------------------------------------------------------
def test_missing_dataset_root(tmp_path, capsys):
    out = tmp_path / "results" / "tok"
    code, err = train(capsys, tmp_path, tiny_config(tmp_path / "no_such_imagenet"), out)
    assert code == 1
    assert f"dataset directory not found: {tmp_path / 'no_such_imagenet' / 'train'}" in error_line(err, "train-tokenizer")
    assert not out.exists()
    assert_nothing_partial(tmp_path)


def test_empty_class_folder(tmp_path, capsys):
    data = image_tree(tmp_path / "data")
    for f in (data / "train" / "c1").iterdir():
        f.unlink()
    out = tmp_path / "results" / "tok"
    code, err = train(capsys, tmp_path, tiny_config(data), out)
    assert code == 1
    assert f"class folder {data / 'train' / 'c1'} holds no images" in error_line(err, "train-tokenizer")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_corrupt_or_truncated_image_is_named(tmp_path, capsys, damage):
    data = image_tree(tmp_path / "data")
    bad = data / "train" / "c0" / "1.png"
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) // 3] if damage == "truncated" else b"this is not a PNG file" * 10)
    assert f"cannot read image {bad}" in raw_pixel_probe_fails(capsys, tmp_path, tiny_config(data))


def test_truncated_image_stops_training_without_a_model(tmp_path, capsys):
    data = image_tree(tmp_path / "data")
    bad = data / "train" / "c1" / "2.png"
    bad.write_bytes(bad.read_bytes()[:100])
    out = tmp_path / "results" / "tok"
    code, err = train(capsys, tmp_path, tiny_config(data), out)
    assert code == 1
    assert f"cannot read image {bad}" in error_line(err, "train-tokenizer")
    assert_nothing_partial(tmp_path, out / "model.pt")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_grayscale_rgba_and_palette_images_are_converted(tmp_path, capsys, mode):
    from mergevq.data.datasets import build_dataset

    data = tmp_path / "data"
    make_folder(data / "train", mode=mode)
    make_folder(data / "val", mode="RGB")
    cfg = tiny_config(data)
    image, label = build_dataset(cfg, "train")[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and -1 <= image.min() <= image.max() <= 1
    assert label == 1
    out = tmp_path / "results" / "probe.json"
    code, err = mergevq(capsys, "linear-probe", "--config", write_config(tmp_path, cfg), "--raw-pixels", "--out", str(out))
    assert code == 0, err[-2000:]
    assert out.exists()


def test_more_class_folders_than_num_classes(tmp_path, capsys):
    """Labels would be out of the heads' range: refused before anything is built."""
    data = image_tree(tmp_path / "data", classes=("c0", "c1", "c2"))
    line = raw_pixel_probe_fails(capsys, tmp_path, tiny_config(data))
    assert f"{data / 'train'} has 3 class folders but data.num_classes is 2" in line


def test_digits_labels_out_of_range(tmp_path, capsys):
    line = raw_pixel_probe_fails(capsys, tmp_path, tiny_config(num_classes=5))
    assert "data.num_classes is 5 but the digits have 10 classes" in line


# ---- config and arguments -----------------------------------------------------------------------
@pytest.mark.parametrize("override,names", [
    ("tokenizer.train.lrr=1e-3", ["tokenizer.train", "unknown key(s) lrr"]),
    ("eval.fid.num_imags=64", ["eval.fid", "unknown key(s) num_imags"]),
    ("tokenizer.train.scheduler=cosin", ["tokenizer.train.scheduler", "'cosin'"]),
])
def test_config_typo_is_named(tmp_path, capsys, override, names):
    out = tmp_path / "results" / "tok"
    code, err = train(capsys, tmp_path, tiny_config(), out, "--set", override)
    assert code == 2
    line = error_line(err, "train-tokenizer")
    assert all(n in line for n in names), line
    assert not out.exists()


def test_config_typo_in_the_file(tmp_path, capsys):
    cfg = tiny_config()
    cfg["tokenizer"]["variants"][VARIANT]["merge_samplng"] = cfg["tokenizer"]["variants"][VARIANT].pop("merge_sampling")
    out = tmp_path / "results" / "tok"
    code, err = train(capsys, tmp_path, cfg, out)
    assert code == 2
    line = error_line(err, "train-tokenizer")
    assert f"tokenizer.variants.{VARIANT}" in line and "merge_samplng" in line and "merge_sampling" in line
    assert not out.exists()


@pytest.mark.parametrize("kept,message", [
    (30, "kept: 30 is not a perfect square"),
    (100, "kept: kept count 100 exceeds the token count 64"),
])
def test_non_square_or_too_large_kept_in_config(tmp_path, capsys, kept, message):
    out = tmp_path / "results" / "tok"
    code, err = train(capsys, tmp_path, tiny_config(), out, "--set", f"tokenizer.variants.{VARIANT}.kept={kept}")
    assert code == 2
    line = error_line(err, "train-tokenizer")
    assert f"tokenizer.variants.{VARIANT}.{message}" in line
    assert not out.exists()


def test_too_large_kept_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "results" / "probe.json"
    code, err = mergevq(capsys, "linear-probe", "--config", write_config(tmp_path, tiny_config()),
                        "--random-init", VARIANT, "--kept", "100", "--out", str(out))
    assert code == 2
    assert f"--kept 100 is not in [1, 64] for variant {VARIANT}" in error_line(err, "linear-probe")
    assert_nothing_partial(tmp_path, out)


def test_unknown_variant(tmp_path, capsys):
    cfg_path = write_config(tmp_path, tiny_config())
    code, err = mergevq(capsys, "train-tokenizer", "--config", cfg_path, "--variant", "GR", "--out", str(tmp_path / "t"))
    assert code == 2 and "argument --variant: invalid choice: 'GR'" in error_line(err, "train-tokenizer")
    # a known variant the config does not define
    code, err = mergevq(capsys, "train-tokenizer", "--config", cfg_path, "--variant", "G", "--out", str(tmp_path / "t"))
    assert code == 2
    assert "tokenizer.variants: no variant 'G' (have ['G+R'])" in error_line(err, "train-tokenizer")
    assert not (tmp_path / "t").exists()


def test_unknown_generator(tmp_path, capsys):
    code, err = mergevq(capsys, "train-generator", "--config", write_config(tmp_path, tiny_config()), "--generator",
                        "llamagn", "--variant", VARIANT, "--codes", str(tmp_path / "codes.json"),
                        "--out", str(tmp_path / "gen"))
    assert code == 2 and "argument --generator: invalid choice: 'llamagn'" in error_line(err, "train-generator")
    assert not (tmp_path / "gen").exists()


# ---- checkpoints and weights -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 8-step training (model.pt + last.ckpt) of the tiny config on the digits."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("trained")
    cfg_path = write_config(root, tiny_config())
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train-tokenizer", "--config", cfg_path, "--variant", VARIANT, "--out", str(root / "tok")])
    assert code == 0, err.getvalue()[-3000:]
    return root, cfg_path


def test_truncated_model_is_refused_by_name(trained, tmp_path, capsys):
    root, cfg_path = trained
    bad = tmp_path / "model.pt"
    blob = (root / "tok" / "model.pt").read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])
    out = tmp_path / "results" / "probe.json"
    code, err = mergevq(capsys, "linear-probe", "--config", cfg_path, "--tokenizer", str(bad), "--out", str(out))
    assert code == 1
    line = error_line(err, "linear-probe")
    assert f"truncated or corrupt checkpoint {bad} ({len(blob) // 2} bytes)" in line
    assert_nothing_partial(tmp_path, out)


def test_truncated_resume_checkpoint_is_not_trained_over(trained, tmp_path, capsys):
    """A resumable run whose last.ckpt is truncated: refused, the evidence left in place, no model."""
    root, _ = trained
    out = tmp_path / "results" / "tok"
    out.mkdir(parents=True)
    blob = (root / "tok" / "last.ckpt").read_bytes()
    (out / "last.ckpt").write_bytes(blob[: len(blob) // 2])
    code, err = train(capsys, tmp_path, tiny_config(), out)
    assert code == 1
    assert f"truncated or corrupt checkpoint {out / 'last.ckpt'}" in error_line(err, "train-tokenizer")
    assert (out / "last.ckpt").stat().st_size == len(blob) // 2
    assert_nothing_partial(tmp_path, out / "model.pt")


def test_missing_weight_file(tmp_path, capsys):
    cfg = tiny_config()
    cfg["weights"]["vgg16"] = str(tmp_path / "weights" / "vgg16-397923af.pth")
    cfg["tokenizer"]["loss"]["perceptual"] = 0.5
    out = tmp_path / "results" / "tok"
    code, err = train(capsys, tmp_path, cfg, out)
    assert code == 1
    line = error_line(err, "train-tokenizer")
    assert f"weights.vgg16: file not found: {tmp_path / 'weights' / 'vgg16-397923af.pth'}" in line
    assert "mergevq fetch-weights" in line
    assert not out.exists()


def test_nan_loss_stops_without_a_model(tmp_path, capsys):
    """lr 1e30 overflows the weights in one Adam step: the next loss is NaN."""
    out = tmp_path / "results" / "tok"
    code, err = train(capsys, tmp_path, tiny_config(), out, "--set", "tokenizer.train.lr=1e30")
    assert code == 1
    line = error_line(err, "train-tokenizer")
    assert re.search(rf"\[{re.escape(VARIANT)}\] non-finite loss at step \d+ \(.*loss=nan", line), line
    assert "no checkpoint was written yet" in line or "last good checkpoint" in line
    assert_nothing_partial(tmp_path, out / "model.pt")
