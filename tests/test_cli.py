"""mergevq.cli: expected failures print one line and exit 2 (config / usage) or 1 (other); --debug
or MERGEVQ_DEBUG=1 adds the traceback; anything else (a bug) still raises."""
import dataclasses

import pytest
import torch

from mergevq import cli
from mergevq.config import REPO_ROOT

DEMO = str(REPO_ROOT / "config" / "demo.yaml")
PAPER = str(REPO_ROOT / "config" / "config.yaml")
TINY = dict(ch=8, num_res_blocks=1, dim=16, depth=2, heads=2, dec_ch=8, dec_num_res_blocks=1, dec_dim=16,
            dec_depth=1, dec_heads=2, rec_dim=16, rec_heads=2, rec_ffn=32)


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)


@pytest.fixture
def tokenizer_file(tmp_path):
    """A G+R-demo model.pt (64 tokens) with random weights."""
    from mergevq.tokenizer import build_tokenizer

    torch.manual_seed(0)
    model = build_tokenizer("G+R-demo", **TINY)
    path = tmp_path / "model.pt"
    torch.save({"variant": "G+R", "tokenizer_config": dataclasses.asdict(model.config), "ema": model.state_dict(),
                "model": model.state_dict(), "kept": 36, "step": 0}, path)
    return path


@pytest.fixture
def reference_file(tmp_path):
    path = tmp_path / "reference.pt"
    torch.save({"features": {"64": torch.zeros(2, 64)}, "labels": torch.zeros(2, dtype=torch.long),
                "weights_sha256": "0" * 64, "num_images": 2, "fid_layer": "64", "isc_layer": None}, path)
    return path


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith(f"mergevq {command}: error: ")
    return lines[0]


def evaluate_argv(tokenizer, reference, tmp_path, kept="81"):
    return ["evaluate", "--config", DEMO, "--tokenizer", str(tokenizer), "--kept", kept,
            "--reference", str(reference), "--classifier", str(tmp_path / "classifier.pt"),
            "--out", str(tmp_path / "metrics.json")]


def test_kept_beyond_the_tokens_is_a_usage_error(tmp_path, tokenizer_file, reference_file, capsys):
    assert cli.main(evaluate_argv(tokenizer_file, reference_file, tmp_path)) == 2
    line = one_error_line(capsys, "evaluate")
    assert "--kept 81 is not in [1, 64]" in line and str(tokenizer_file) in line
    assert not (tmp_path / "metrics.json").exists()


def test_truncated_model_file(tmp_path, tokenizer_file, reference_file, capsys):
    tokenizer_file.write_bytes(tokenizer_file.read_bytes()[:5000])
    assert cli.main(evaluate_argv(tokenizer_file, reference_file, tmp_path, kept="36")) == 1
    line = one_error_line(capsys, "evaluate")
    assert "truncated or corrupt checkpoint" in line and str(tokenizer_file) in line


def test_missing_reference_and_missing_tokenizer(tmp_path, tokenizer_file, reference_file, capsys):
    assert cli.main(evaluate_argv(tokenizer_file, tmp_path / "nope.pt", tmp_path, kept="36")) == 1
    assert str(tmp_path / "nope.pt") in one_error_line(capsys, "evaluate")
    assert cli.main(evaluate_argv(tmp_path / "gone.pt", reference_file, tmp_path, kept="36")) == 1
    assert str(tmp_path / "gone.pt") in one_error_line(capsys, "evaluate")


def test_missing_weights_file(tmp_path, capsys):
    missing = tmp_path / "inception.pth"
    argv = ["reference-features", "--config", PAPER, "--out", str(tmp_path / "ref.pt"),
            "--set", f"weights.inception={missing}"]
    assert cli.main(argv) == 1
    line = one_error_line(capsys, "reference-features")
    assert "weights.inception" in line and str(missing) in line


def test_missing_dataset_root(tmp_path, capsys):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"never loaded: the dataset is checked first")
    argv = ["reference-features", "--config", PAPER, "--out", str(tmp_path / "ref.pt"),
            "--set", f"weights.inception={weights}", f"data.root={tmp_path / 'imagenet'}"]
    assert cli.main(argv) == 1
    line = one_error_line(capsys, "reference-features")
    assert "dataset directory not found" in line and str(tmp_path / "imagenet" / "val") in line


@pytest.mark.parametrize("overrides,expected", [
    (["eval.fid.bootstrap_resamples=-1"], "eval.fid.bootstrap_resamples"),
    (["eval.fid.no_such_key=1"], "no_such_key"),
])
def test_config_errors_are_one_line_exit_2(tmp_path, reference_file, tokenizer_file, capsys, overrides, expected):
    argv = evaluate_argv(tokenizer_file, reference_file, tmp_path, kept="36") + ["--set", *overrides]
    assert cli.main(argv) == 2
    assert expected in one_error_line(capsys, "evaluate")
    assert cli.main(["validate-config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in one_error_line(capsys, "validate-config")


def test_debug_prints_the_traceback(tmp_path, tokenizer_file, reference_file, capsys, monkeypatch):
    argv = evaluate_argv(tokenizer_file, reference_file, tmp_path)
    for call in (lambda: cli.main(["--debug", *argv]), lambda: cli.main([*argv, "--debug"])):
        assert call() == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "ConfigError" in err
        assert err.strip().splitlines()[-1].startswith("mergevq evaluate: error: --kept 81")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli.main(argv) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_still_raises(monkeypatch):
    """Only expected failures are caught: a KeyError, or a ValueError from inside a library, is a bug."""
    import mergevq.config_cli as module

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(module, "run", broken)
    with pytest.raises(KeyError):
        cli.main(["validate-config", DEMO])

    def library_value_error(args):
        import numpy as np

        np.zeros(3).reshape(2, 2)  # ValueError raised inside numpy

    monkeypatch.setattr(module, "run", library_value_error)
    with pytest.raises(ValueError):
        cli.main(["validate-config", DEMO])
    assert cli.expected_exit_code(FileNotFoundError("x")) == 1
    assert cli.expected_exit_code(RuntimeError("x")) is None


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "--config", DEMO])  # required arguments missing: argparse's own message
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err
