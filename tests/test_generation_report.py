"""Table 3, Table 5's generator rows and Fig. A2 from synthetic generation metrics and sample folders."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mergevq.config import load_config
from mergevq.files import torch_save, write_json
from mergevq.report import figures, tables


@pytest.fixture(scope="module")
def cfg():
    from mergevq.config import REPO_ROOT

    return load_config(REPO_ROOT / "config" / "demo.yaml")


def generation_record(name: str, gfid: float, cfg_scale: float = 3.0) -> dict:
    sweep = [{"cfg_scale": s, "gfid": gfid + abs(s - cfg_scale), "is": 3.0, "path": f"cfg{s}/metrics.json",
              "class_consistency": {"top1": 0.5 + 0.1 * s}} for s in (1.0, 2.0, 3.0)]
    return {"gfid": gfid, "is": 3.5, "is_std": 0.1, "num_samples": 1000, "smoke": True, "generator_name": name,
            "generator_params": 460_000,
            "settings": {"cfg_scale": cfg_scale, "temperature": 1.0, "top_k": None, "top_p": None},
            "fid_protocol": {"extractor": "demo-classifier", "reference": "digits validation images (first 360)"},
            "class_consistency": {"top1": 0.85}, "cfg_sweep": sweep,
            "memorisation": {"near_duplicate_quantile": 0.05, "distinct_share": 1.0,
                             "samples": {"near_duplicate_share": 0.01, "exact_copy_share": 0.0, "nearest_distance_mean": 0.6},
                             "validation": {"near_duplicate_share": 0.05, "nearest_distance_mean": 0.5}}}


def test_table3_fills_the_reproduced_row_and_leaves_the_rest(cfg, tmp_path):
    write_json(tmp_path / "gr.json", generation_record("llamagen_G+R", 2.5))
    table = tables.build("table3", [tmp_path / "gr.json"], cfg)
    df = table.frame
    ours = df[df["gfid"].notna()]
    assert len(ours) == 1
    row = ours.iloc[0]
    # the demo's G+R grid has 64 positions: the paper's 256-step row at the same share of its grid
    assert (row["tokenizer"], row["generator"], row["paper_steps"], row["steps"]) == ("MergeVQ (G+R)", "LlamaGen-L", 256, 64)
    assert row["gfid"] == 2.5 and row["paper_gfid"] == 3.28 and row["class_consistency"] == pytest.approx(85.0)
    assert row["cfg_scale"] == 3.0 and row["params_m"] == pytest.approx(0.46)
    # MergeAR / RandAR rows: the paper's numbers only, never ours
    mergear = df[df["generator"] == "MergeAR (Ours)"]
    assert len(mergear) == 2 and mergear["gfid"].isna().all() and mergear["paper_gfid"].notna().all()
    assert len(df) == 37  # every paper row, nothing added
    text = " ".join(table.notes)
    assert "smoke" in text and "sweep (3 scales" in text and "class consistency 80.0%" in text


def test_table3_adds_runs_without_a_paper_row(cfg, tmp_path):
    cfg = {**cfg, "tokenizer": {**cfg["tokenizer"], "variants": dict(cfg["tokenizer"]["variants"])}}
    write_json(tmp_path / "g.json", generation_record("llamagen_G", 4.0))
    df = tables.build("table3", [tmp_path / "g.json"], cfg).frame
    extra = df[df["tokenizer"] == "MergeVQ (G)"].dropna(subset=["gfid"])
    assert len(extra) == 1 and math.isnan(extra.iloc[0]["paper_gfid"]) and extra.iloc[0]["steps"] == 256
    write_json(tmp_path / "bad.json", generation_record("llamagen_X", 4.0))
    with pytest.raises(tables.ReportError, match="not a \\(generator, variant\\) pair"):
        tables.build("table3", [tmp_path / "bad.json"], cfg)
    with pytest.raises(tables.ReportError, match="two generation files"):
        tables.build("table3", [tmp_path / "g.json", tmp_path / "g.json"], cfg)


def test_table5_appends_generator_rows(cfg, tmp_path):
    write_json(tmp_path / "gr.json", generation_record("llamagen_G+R", 2.5))
    df = tables.build("table5", [tmp_path / "gr.json"], cfg).frame
    gen = df[df["version"].str.contains("LlamaGen")]
    # (G+R) ours beside the paper's; (G) the paper's only (the demo trains no G generator)
    assert set(gen["version"]) == {"(G+R)+LlamaGen", "(G)+LlamaGen"}
    gr = gen[gen["version"] == "(G+R)+LlamaGen"].iloc[0]
    assert gr["gfid"] == 2.5 and gr["paper_gfid"] == 3.28 and gr["tokens"] == 64 and gr["paper_k"] == 256
    assert math.isnan(gen[gen["version"] == "(G)+LlamaGen"].iloc[0]["gfid"])
    # without generation files: the paper's generator rows, ours empty
    empty = tables.build("table5", [], cfg).frame
    # the paper's four generator rows: (G+R)+RandAR, (G+R)+LlamaGen, (G)+LlamaGen, (G)+MergeAR
    assert empty["gfid"].isna().all() and empty["paper_gfid"].notna().sum() == 4


def mergear_randar_records(tmp_path):
    write_json(tmp_path / "m.json", {**generation_record("mergear_G+R", 2.2), "generator_kind": "mergear",
                                     "mergear_cache": {"samples": 10, "samples_over_k": 4, "batches_grown": 2,
                                                       "kept_mean": 40.0, "mean_cache_entries": 25.0,
                                                       "sequence_length": 64}})
    rec = generation_record("randar_G+R", 2.0)
    rec["settings"]["generate"] = {"steps": 16, "cfg_schedule": "linear"}
    write_json(tmp_path / "r.json", {**rec, "generator_kind": "randar"})
    return [tmp_path / "m.json", tmp_path / "r.json"]


def test_table3_fills_mergear_and_randar_rows(cfg, tmp_path):
    table = tables.build("table3", mergear_randar_records(tmp_path), cfg)
    df = table.frame
    ours = df[df["gfid"].notna()].set_index("generator")
    assert len(df) == 37 and set(ours.index) == {"MergeAR (Ours)", "RandAR-L-cfg"}
    m, r = ours.loc["MergeAR (Ours)"], ours.loc["RandAR-L-cfg"]
    # MergeAR: the paper's (G+R) 256-step row, our 64 raster steps; RandAR: the (G+R) row, our T = 16
    assert (m["tokenizer"], m["paper_steps"], m["steps"], m["gfid"]) == ("MergeVQ (G+R)", 256, 64, 2.2)
    assert (r["tokenizer"], r["paper_steps"], r["steps"], r["gfid"]) == ("MergeVQ (G+R)", 64, 16, 2.0)
    text = " ".join(table.notes)
    assert "randar_G+R: CFG ramped linearly from 1 to 3" in text
    assert "40.0 distinct codes kept of 63 inputs" in text and "4 of 10 samples kept more than K" in text


def test_table5_mergear_and_randar_rows(cfg, tmp_path):
    df = tables.build("table5", mergear_randar_records(tmp_path), cfg).frame.set_index("version")
    r = df.loc["(G+R)+RandAR"]
    # RandAR emits the K = 36 merged codes (the paper's 144), placed by the fine-tuned recovery
    assert (r["tokens"], r["paper_k"], r["gfid"], r["paper_gfid"]) == (36, 144, 2.0, 2.63)
    assert r["recovery"] == "fine-tuned Source Recovery"
    m = df.loc["(G+R)+MergeAR"]  # no paper row at G+R: ours alone
    assert m["tokens"] == 64 and m["gfid"] == 2.2 and math.isnan(m["paper_gfid"])


def sample_folder(root, name: str, num_classes: int = 10, per_class: int = 3):
    """A `mergevq sample` folder: samples.json, samples.npz (class c drawn with grey level 20 c), codes.pt."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = np.stack([np.full((32, 32, 3), 20 * int(c), np.uint8) for c in labels])
    root.mkdir(parents=True)
    with open(root / "samples.npz", "wb") as fh:
        np.savez(fh, arr_0=images)
    torch_save({"codes": torch.zeros(len(labels), 64, dtype=torch.long), "labels": labels, "settings": {}}, root / "codes.pt")
    write_json(root / "samples.json", {"settings": {"cfg_scale": 2.0, "temperature": 1.0}, "generator_name": name})
    return root


def test_figA2_draws_a_panel_per_generator(tmp_path):
    a = sample_folder(tmp_path / "a", "llamagen_G+R")
    write_json(a / "metrics.json", generation_record("llamagen_G+R", 2.5))
    b = sample_folder(tmp_path / "b", "llamagen_G")
    out = figures.figA2_samples([a, b], tmp_path / "figA2.png", per_class=3)
    from PIL import Image

    with Image.open(out) as img:
        assert img.width > img.height / 2
    with pytest.raises(ValueError, match="class 0 has 3 samples"):
        figures.figA2_samples([a], tmp_path / "x.png", per_class=4)
    with pytest.raises(FileNotFoundError, match="samples.json"):
        figures.figA2_samples([tmp_path], tmp_path / "x.png")
    assert json.loads((a / "samples.json").read_text())["generator_name"] == "llamagen_G+R"
