"""Tables and figures from small synthetic metric files and a tiny random tokenizer."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from mergevq.config import load_config
from mergevq.eval.bootstrap import FID_INTERVAL_DESCRIPTION, FID_INTERVAL_METHOD
from mergevq.files import write_json
from mergevq.report import figures, tables


@pytest.fixture(scope="module")
def cfg():
    from mergevq.config import REPO_ROOT

    return load_config(REPO_ROOT / "config" / "demo.yaml")


def sweep_record(variant: str, kept: int, tokens: int, num_images: int = 360) -> dict:
    rfid = 10.0 + 100.0 / kept
    interval = {"ci_method": FID_INTERVAL_METHOD, "ci_level": 0.95, "resamples": 2000, "resample_mean": rfid + 0.5}
    return {
        "variant": variant, "kept": kept, "tokens": tokens, "num_images": num_images,
        "tokenizer_sha256": f"sha-{variant}", "config_hash": "abc",
        "psnr_gt": 20.0 + kept / 10, "psnr_pred": 19.0 + kept / 10, "ssim_gt": 0.8, "ssim_pred": 0.7,
        "lpips_gt": None, "lpips_pred": None,
        "rfid_gt": {"value": rfid, "ci_low": rfid - 1, "ci_high": rfid + 1, **interval},
        "rfid_pred": {"value": rfid + 2, "ci_low": rfid + 1, "ci_high": rfid + 3, **interval},
        "fid_protocol": {"extractor": "demo-classifier", "weights_sha256": "w", "num_images": num_images,
                         "resolution": [32, 32], "image_format": "uint8", "reference": "val",
                         "bootstrap": {"method": FID_INTERVAL_METHOD, "description": FID_INTERVAL_DESCRIPTION,
                                       "resamples": 2000, "level": 0.95},
                         "smoke": num_images < 2048},
        "source_accuracy": 0.9, "source_accuracy_chance": 1 / kept, "source_accuracy_position_baseline": 0.5,
        "codebook_usage": 0.42, "codebook_perplexity": 300.0,
        "classifier_top1_original": 0.99, "classifier_top1_recon_gt": 0.9, "classifier_top1_recon_pred": 0.85,
        "encoder_gmacs": 0.01 * kept, "decoder_gmacs": 0.05, "tokens_per_image": kept,
    }


def probe_record(variant, kept, top1, encoder="trained") -> dict:
    return {"variant": variant, "kept": kept, "encoder": encoder, "features": "tokens_mean", "top1": top1,
            "train_top1": 0.99, "epochs": 30, "num_train": 1437, "num_val": 360}


@pytest.fixture(scope="module")
def metric_files(cfg, tmp_path_factory):
    """Synthetic results/{run}/ tree: full sweeps, probes at the target K only (others missing),
    baselines, fine-tuning for G+R only."""
    root = tmp_path_factory.mktemp("results")
    files = {"sweep": [], "probe": [], "finetune": []}
    for v, var in cfg["tokenizer"]["variants"].items():
        for k in var["sweep"]:
            p = root / "sweep" / v / f"k{k}" / "metrics.json"
            write_json(p, sweep_record(v, k, var["tokens"]))
            files["sweep"].append(p)
        p = root / "probe" / v / f"k{var['kept']}" / "metrics.json"
        write_json(p, probe_record(v, var["kept"], 0.8))
        files["probe"].append(p)
        p = root / "probe" / "baselines" / f"random_{v}" / "metrics.json"
        write_json(p, probe_record(v, var["kept"], 0.3, "random_init"))
        files["probe"].append(p)
    p = root / "probe" / "baselines" / "raw_pixels" / "metrics.json"
    write_json(p, probe_record(None, None, 0.5, "raw_pixels"))
    files["probe"].append(p)
    p = root / "finetune" / "G+R" / "metrics.json"
    write_json(p, {"variant": "G+R", "kept": 36, "top1": 0.95, "epochs": 5, "num_train": 1437, "num_val": 360,
                   "lr": 1.5e-3, "layer_decay": 1.0})
    files["finetune"].append(p)
    return files


def paper(name):
    return tables.PAPER_DIR / f"{name}.csv"


def test_smoke_threshold_matches_fidelity():
    from mergevq.eval.fidelity import SMOKE_THRESHOLD

    assert tables.SMOKE_THRESHOLD == SMOKE_THRESHOLD


def test_table1_paper_values_and_baselines(cfg, metric_files):
    df, notes = tables.build_table1(metric_files["probe"], metric_files["finetune"], paper("table1"), cfg)
    rows = df.set_index("method")
    assert rows.loc["MergeVQ (G+R)", "paper_linear_top1"] == 77.9
    assert rows.loc["MergeVQ (R)", "paper_finetune_top1"] == 84.2
    assert math.isnan(rows.loc["MergeVQ (G)", "paper_linear_top1"])  # no G row in the paper
    assert rows.loc["MergeVQ (G+R)", "linear_top1"] == pytest.approx(80.0)
    assert rows.loc["MergeVQ (G+R)", "finetune_top1"] == pytest.approx(95.0)
    assert pd.isna(rows.loc["MergeVQ (R)", "finetune_top1"])  # missing fine-tune file: empty cell
    assert rows.loc["raw pixels", "linear_top1"] == pytest.approx(50.0)
    assert rows.loc["MergeVQ (G) encoder, random init", "linear_top1"] == pytest.approx(30.0)
    assert any("peak lr 0.0015 (base lr x batch / base batch), layer-wise lr decay 1" in n for n in notes)


def test_table2_matches_paper_at_equivalent_k(cfg, metric_files):
    df, notes = tables.build_table2(metric_files["sweep"], paper("table2"), cfg)
    rows = df.set_index("method")
    # demo G+R keeps 36 of 64 tokens = the paper's 144 of 256
    assert rows.loc["MergeVQ (G+R)", "paper_k"] == 144
    assert rows.loc["MergeVQ (G+R)", "paper_rfid"] == 1.48
    assert rows.loc["MergeVQ (G)", "paper_rfid"] == 1.06  # 64 of 256 = 256 of 1024
    assert pd.isna(rows.loc["MergeVQ (R)", "paper_rfid"])  # paper R row is at 144, R keeps 36
    assert rows.loc["MergeVQ (G+R)", "codebook_usage_percent"] == pytest.approx(42.0)
    assert any("smoke" in n for n in notes)


def test_table4_sweep_paper_k_and_missing_probe(cfg, metric_files, tmp_path):
    df, notes = tables.build_table4(metric_files["sweep"], metric_files["probe"], paper("table4"), cfg)
    assert len(df) == sum(len(v["sweep"]) for v in cfg["tokenizer"]["variants"].values())
    gr = df[df["variant"] == "G+R"].set_index("tokens")
    assert gr.loc[36, "paper_k"] == 144 and gr.loc[36, "paper_rfid"] == 3.07 and gr.loc[36, "paper_steps"] == 36
    assert gr.loc[36, "linear_top1"] == pytest.approx(80.0)
    assert pd.isna(gr.loc[49, "linear_top1"])  # no probe at this K: empty, not a crash
    assert gr.loc[49, "tokens_per_image"] == 49 and "sampling_steps" not in df.columns
    assert gr.loc[49, "gmacs"] == pytest.approx(0.49 + 0.05)
    r = df[df["variant"] == "R"].set_index("tokens")
    assert r.loc[9, "paper_linear_top1"] == 54.3 and pd.isna(r.loc[9, "paper_rfid"])
    g = df[df["variant"] == "G"].set_index("tokens")
    assert g.loc[64, "paper_rfid"] == 1.41 and pd.isna(g.loc[196, "paper_rfid"])  # 784: not in the paper
    assert list(g.index) == sorted(g.index, reverse=True)
    assert any("tokens_per_image" in n and "K in every row" in n and "'#Step'" in n for n in notes)
    assert any(f"{FID_INTERVAL_METHOD} ({FID_INTERVAL_DESCRIPTION}), 95% level, 2000 resamples" in n for n in notes)

    md = tables.write_table(df, notes, tmp_path / "tables" / "table4.csv", tables.TITLES["table4"])
    text = md.read_text()
    assert md.exists() and "**smoke**" in text and "multiply-accumulates" in text
    assert "nan" not in text.lower()  # empty cells print as a dash
    assert "nan" not in (tmp_path / "tables" / "table4.csv").read_text().lower()  # and are empty in the CSV
    assert pd.read_csv(tmp_path / "tables" / "table4.csv").shape == df.shape


def test_table4_per_k_protocol_rows(cfg, metric_files, tmp_path):
    # tokenizers trained per K (train_per_kept) get their own rows, the protocol named; at the target
    # K (36 for the demo's G+R) the main tokenizer stands for the per-K one
    extra = []
    for k, rfid in ((49, 0.5), (25, 0.7)):
        rec = sweep_record("G+R", k, 64)
        rec.update(trained_for_kept=k, tokenizer_sha256=f"per-k-{k}")
        rec["rfid_gt"]["value"] = rfid
        extra.append(tmp_path / f"per_kept_{k}.json")
        write_json(extra[-1], rec)
    df, notes = tables.build_table4(metric_files["sweep"] + extra, metric_files["probe"], paper("table4"), cfg)
    per_k = df[df["protocol"] == tables.TRAINED_PER_K].set_index("tokens")
    assert list(per_k.index) == [49, 36, 25] and set(per_k["variant"]) == {"G+R"}
    assert per_k.loc[49, "rfid"] == 0.5 and per_k.loc[25, "rfid"] == 0.7
    sweep = df[(df["protocol"] == tables.INFERENCE_SWEEP) & (df["variant"] == "G+R")].set_index("tokens")
    assert per_k.loc[36, "rfid"] == sweep.loc[36, "rfid"] and sweep.loc[49, "rfid"] != 0.5
    assert len(df) == sum(len(v["sweep"]) for v in cfg["tokenizer"]["variants"].values()) + 3
    assert any(tables.TRAINED_PER_K in n and "--kept" in n for n in notes)


def test_table4_refuses_mixed_tokenizers(cfg, metric_files, tmp_path):
    rec = sweep_record("G+R", 49, 64)
    rec["tokenizer_sha256"] = "another"
    p = tmp_path / "other.json"
    write_json(p, rec)
    files = [f for f in metric_files["sweep"] if "k49" not in str(f) or "G+R" not in str(f)] + [p]
    with pytest.raises(tables.ReportError, match="mixes tokenizers"):
        tables.build_table4(files, [], paper("table4"), cfg)


def test_table5_paper_rows_and_cli(cfg, metric_files, tmp_path, repo_root):
    df, notes = tables.build_table5(metric_files["sweep"], paper("table5"), cfg)
    gr = df[df["version"] == "(G+R)"].set_index("recovery")
    assert gr.loc[tables.RECOVERY_GT, "paper_rfid"] == 1.48
    assert gr.loc[tables.RECOVERY_PRED, "paper_rfid"] == 1.71
    assert gr.loc[tables.RECOVERY_PRED, "rfid"] == pytest.approx(10 + 100 / 36 + 2)
    assert gr.loc[tables.RECOVERY_PRED, "source_accuracy"] == pytest.approx(90.0)
    assert pd.isna(gr.loc[tables.RECOVERY_GT, "source_accuracy"])

    # the command sorts mixed inputs by content and writes csv + md
    from mergevq.report.tables import add_arguments, run
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "t" / "table5.csv"
    inputs = [str(p) for p in metric_files["probe"] + metric_files["sweep"]]
    args = parser.parse_args(["table5", "--config", str(repo_root / "config" / "demo.yaml"),
                              "--inputs", *inputs, "--out", str(out)])
    assert run(args) == 0
    text = out.with_suffix(".md").read_text()
    assert "1.48" in text and "**smoke**" in text and "demo-classifier" in text
    assert pd.read_csv(out)["paper_rfid"].dropna().tolist() == [1.48, 1.71]


def test_no_smoke_label_at_full_size(cfg, tmp_path):
    p = tmp_path / "m.json"
    write_json(p, sweep_record("G+R", 36, 64, num_images=50000))
    _, notes = tables.build_table2([p], paper("table2"), cfg)
    assert not any("smoke" in n for n in notes)


def test_wrong_kind_of_file_is_refused(cfg, metric_files):
    with pytest.raises(tables.ReportError, match="expected a sweep"):
        tables.build_table2(metric_files["probe"][:1], paper("table2"), cfg)


# -- figures ----------------------------------------------------------------------------------
def _png_ok(path):
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_fig3_and_fig5(cfg, metric_files, tmp_path):
    out = figures.fig3_tradeoff(metric_files["sweep"], metric_files["probe"], cfg, tmp_path / "fig3.png")
    assert _png_ok(out)
    out = figures.fig5_merge_sampling(cfg, tmp_path / "fig5.png", steps=2000)
    assert _png_ok(out)


def test_owner_map():
    source = torch.zeros(1, 2, 4)
    source[0, 0, [0, 1]] = 1
    source[0, 1, [2, 3]] = 1
    assert figures.owner_map(source).tolist() == [[[0, 0], [1, 1]]]


@pytest.fixture(scope="module")
def tiny_model():
    from mergevq.tokenizer import build_tokenizer

    torch.manual_seed(0)
    return build_tokenizer("G+R-demo").eval()


def test_fig4_and_figA1(tiny_model, tmp_path):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert _png_ok(figures.fig4_merge_maps(tiny_model, images, [9, 36], tmp_path / "fig4.png"))
    out = figures.figA1_reconstructions({"G+R": tiny_model}, images, {"G+R": [36, 9]}, tmp_path / "figA1.png")
    assert _png_ok(out)


def test_find_tokenizers(tmp_path):
    for v in ("G", "G+R"):
        (tmp_path / "tokenizer" / v).mkdir(parents=True)
        (tmp_path / "tokenizer" / v / "model.pt").write_bytes(b"x")
    root = tmp_path / "tokenizer"
    assert figures.find_tokenizers([root]) == [root / "G" / "model.pt", root / "G+R" / "model.pt"]
    assert figures.find_tokenizers([root / "G+R"]) == [root / "G+R" / "model.pt"]
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        figures.find_tokenizers([tmp_path / "missing"])


def test_table1_extra_feature_columns(cfg, metric_files, tmp_path):
    extra = []
    for i, (variant, encoder, top1) in enumerate([("G+R", "trained", 0.61), ("G+R", "random_init", 0.12)]):
        record = probe_record(variant, cfg["tokenizer"]["variants"][variant]["kept"], top1, encoder)
        record["features"] = "global"
        path = tmp_path / f"extra{i}.json"
        path.write_text(json.dumps(record))
        extra.append(path)
    df, notes = tables.build_table1(list(metric_files["probe"]) + extra, metric_files["finetune"], paper("table1"), cfg)
    rows = df.set_index("method")
    assert rows.loc["MergeVQ (G+R)", "linear_top1_global"] == pytest.approx(61.0)
    assert rows.loc["MergeVQ (G+R) encoder, random init", "linear_top1_global"] == pytest.approx(12.0)
    assert rows.loc["MergeVQ (G+R)", "linear_top1"] == pytest.approx(80.0)  # the primary kind is untouched
    assert pd.isna(rows.loc["MergeVQ (R)", "linear_top1_global"])
