import subprocess
import sys

import pytest
import yaml

from mergevq.config import (
    ConfigError,
    config_hash,
    load_config,
    resolve_snakemake_config,
    variant_config,
)


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml"])
def test_shipped_configs_validate(repo_root, name):
    cfg = load_config(repo_root / "config" / name)
    assert set(cfg["tokenizer"]["variants"]) == {"G", "G+R", "R"}


def _write(tmp_path, cfg):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "override, key",
    [
        ({"no_such_key": 1}, "no_such_key"),
        ({"tokenizer": {"variants": {"G": {"kept": 50}}}}, "tokenizer.variants.G.kept"),
        ({"tokenizer": {"variants": {"G": {"kept": 400}}}}, "exceeds the token count"),
        ({"tokenizer": {"variants": {"X": {}}}}, "tokenizer.variants: 'X' is not one of"),
        ({"tokenizer": {"loss": {"recon_type": "l3"}}}, "tokenizer.loss.recon_type"),
        ({"tokenizer": {"variants": {"R": {"sweep": [64, 50]}}}}, "tokenizer.variants.R.sweep"),
        ({"data": {"dataset": "imagefolder", "root": None}}, "data.root"),
    ],
)
def test_bad_configs_name_the_key(repo_root, tmp_path, override, key):
    from mergevq.config import deep_update

    base = yaml.safe_load((repo_root / "config" / "demo.yaml").read_text())
    with pytest.raises(ConfigError, match=key.replace("+", r"\+").replace(".", r"\.")):
        load_config(_write(tmp_path, deep_update(base, override)))


def test_overrides_and_hash(repo_root):
    base = load_config(repo_root / "config" / "demo.yaml")
    cfg = load_config(repo_root / "config" / "demo.yaml", ["tokenizer.variants.G.steps=7", "seed=3"])
    assert cfg["tokenizer"]["variants"]["G"]["steps"] == 7 and cfg["seed"] == 3
    assert config_hash(cfg) != config_hash(base)
    assert config_hash(base) == config_hash(load_config(repo_root / "config" / "demo.yaml"))


def test_variant_config_merges_shared_blocks(repo_root):
    cfg = load_config(repo_root / "config" / "config.yaml")
    r = variant_config(cfg, "R")
    assert r["train"]["scheduler"] == "cosine" and r["train"]["grad_clip"] == 5.0
    assert r["train"]["lr"] == 1e-4 and r["loss"]["source"] == 1.0 and r["loss"]["commitment"] == 0.25
    assert variant_config(cfg, "G")["train"]["scheduler"] == "step"
    with pytest.raises(ConfigError, match="no variant"):
        variant_config(cfg, "Q")


def test_snakemake_resolution_does_not_inherit_paper_keys(repo_root):
    path, cfg = resolve_snakemake_config([repo_root / "config" / "demo.yaml"], {"seed": 5}, repo_root / "config" / "config.yaml")
    assert cfg["data"]["dataset"] == "digits" and cfg["weights"]["dinov2_base"] is None and cfg["seed"] == 5
    _, paper = resolve_snakemake_config([], {}, repo_root / "config" / "config.yaml")
    assert paper["run"] == "imagenet"
    with pytest.raises(ConfigError, match="one --configfile"):
        resolve_snakemake_config(["a.yaml", "b.yaml"], {}, "x")


def test_cli_reports_config_errors(repo_root):
    proc = subprocess.run(
        [sys.executable, "-m", "mergevq", "validate-config", str(repo_root / "config" / "demo.yaml"), "--set", "bogus=1"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "bogus" in proc.stderr


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml"])
def test_per_kept_sampler_sits_around_each_sweep_k(repo_root, name):
    # Table 4's per-K protocol: a tokenizer trained for K samples around K as the main one does
    # around its target; at the target itself the settings are the main tokenizer's.
    from mergevq.data.merge_sampling import MergeRatioSampler

    cfg = load_config(repo_root / "config" / name)
    for variant, var in cfg["tokenizer"]["variants"].items():
        main = variant_config(cfg, variant)
        at_target = variant_config(cfg, variant, var["kept"])
        assert at_target["merge_sampling"] == main["merge_sampling"] and at_target["trained_for_kept"] == var["kept"]
        main_mode = MergeRatioSampler.from_config(main["merge_sampling"]).mode()
        for k in var["sweep"]:
            vc = variant_config(cfg, variant, k)
            sampler = MergeRatioSampler.from_config(vc["merge_sampling"])
            assert vc["kept"] == k and k in sampler.support()
            if main_mode == var["kept"]:
                assert sampler.mode() == k, (variant, k, sampler.probabilities())


def test_per_kept_refuses_a_non_square_or_too_large_k(repo_root):
    cfg = load_config(repo_root / "config" / "demo.yaml")
    for bad in (50, 81):  # not a square; larger than the 64 tokens of G+R
        with pytest.raises(ConfigError, match="G\\+R"):
            variant_config(cfg, "G+R", bad)
