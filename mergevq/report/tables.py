"""Tables 1, 2, 4 and 5 of the paper rebuilt from our metric files, with the paper's number beside ours.

Inputs are the JSON files that `mergevq evaluate`, the linear probe and fine-tuning write
(schemas in the contracts: ``sweep/{variant}/k{K}``, ``probe/{variant}/k{K}``,
``probe/baselines/*``, ``finetune/{variant}``) and the hand-transcribed paper CSVs in
``results/paper/`` (their README gives the join keys used here). Every builder returns a
``Table(frame, notes)``: ``frame`` is pure data (one CSV), ``notes`` are sentences that state the
protocol (dataset, resolution, FID feature extractor, image count, "smoke", what each column
counts) and go under the Markdown twin only.

Units: accuracies and codebook usage are in percent as in the paper (our files hold fractions);
rFID, PSNR (dB), SSIM, LPIPS as measured; GMACs are 1e9 multiply-accumulates per image.

Paper-equivalent K. The demo scales the paper's grids down (G 1024 -> 256 tokens, G+R and R
256 -> 64), so its kept counts are the paper's scaled by the token ratio. ``paper_k = K *
L_paper / L_ours`` is the paper's kept count with the same kept fraction; the paper columns are
filled only where the paper's table has exactly ``paper_k`` tokens. On the paper config
``paper_k == K``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import pandas as pd

from mergevq.config import REPO_ROOT
from mergevq.eval.bootstrap import paired_bootstrap

PAPER_DIR = REPO_ROOT / "results" / "paper"
# Tokens before merging, L, of each variant in the paper (Sec. 5.1, Table A1 at 256 px).
PAPER_TOKENS = {"G": 1024, "G+R": 256, "R": 256}
# Same threshold as mergevq.eval.fidelity.SMOKE_THRESHOLD (a test keeps them equal); repeated so
# that building a table does not import torch.
SMOKE_THRESHOLD = 2048
TABLES = ("table1", "table2", "table3", "table4", "table5")
TITLES = {
    "table1": "Table 1: self-supervised pre-training (linear probing and fine-tuning top-1, %)",
    "table2": "Table 2: reconstruction at each variant's kept count",
    "table4": "Table 4: kept tokens at inference vs reconstruction, linear probing, cost and steps",
    "table3": "Table 3: class-conditional generation (gFID / IS), the paper's rows beside ours",
    "table5": "Table 5: reconstruction with the ground-truth source S vs Source Recovery's S_hat, and generators on MergeVQ codes",
}
# Table 5: our recovery label -> the paper's `recovery` cell for the same setting.
RECOVERY_GT = "ground-truth S"
RECOVERY_PRED = "predicted S_hat (Source Recovery)"
RECOVERY_FT = "fine-tuned Source Recovery"
# The paper does not say whether its row's recovery was fine-tuned (App. A.2: "5 (optional)" epochs).
PAPER_RECOVERY = {RECOVERY_GT: "Ground-truth S", RECOVERY_PRED: "2-layer Cross-Attention",
                  RECOVERY_FT: "2-layer Cross-Attention"}


class Table(NamedTuple):
    frame: pd.DataFrame
    notes: list[str]


class ReportError(ValueError):
    """Inputs that cannot make a correct table; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Reading metric files


def record_kind(record: dict) -> str:
    """'sweep' | 'probe' | 'finetune' | 'generation' from a metrics.json's keys (the schemas differ)."""
    if "gfid" in record:
        return "generation"
    if "rfid_gt" in record:
        return "sweep"
    if "encoder" in record and "top1" in record:
        return "probe"
    if "top1" in record:
        return "finetune"
    raise ReportError("not a sweep, probe or fine-tune metrics file (no rfid_gt / top1 key)")


def read_metrics(paths: Iterable[str | Path], kind: str | None = None) -> list[dict]:
    """Load JSON metric files; each dict gets ``_path``. With ``kind``, refuse files of another kind."""
    out = []
    for path in paths:
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ReportError(f"{path}: cannot read metrics JSON: {exc}") from exc
        try:
            found = record_kind(record)
        except ReportError as exc:
            raise ReportError(f"{path}: {exc}") from None
        if kind is not None and found != kind:
            raise ReportError(f"{path}: expected a {kind} metrics file, got a {found} one")
        record["_path"] = str(path)
        out.append(record)
    return out


def sort_inputs(paths: Iterable[str | Path]) -> dict[str, list[Path]]:
    """Group metric files by their content: {'sweep': [...], 'probe': [...], 'finetune': [...]}."""
    groups: dict[str, list[Path]] = {"sweep": [], "probe": [], "finetune": [], "generation": []}
    for record in read_metrics(paths):
        groups[record_kind(record)].append(Path(record["_path"]))
    return groups


def _index(records: list[dict], key, what: str) -> dict:
    """{key(record): record}, refusing two files for the same key."""
    out: dict = {}
    for r in records:
        k = key(r)
        if k in out:
            raise ReportError(f"two {what} files for {k}: {out[k]['_path']} and {r['_path']}")
        out[k] = r
    return out


def _fraction_to_percent(value, path: str, key: str) -> float:
    if value is None:
        return math.nan
    if not 0.0 <= value <= 1.0:
        raise ReportError(f"{path}: {key}={value} is not a fraction in [0, 1]")
    return 100.0 * value


# ---------------------------------------------------------------------------------------------
# Config helpers


def variants(cfg: dict) -> list[str]:
    return list(cfg["tokenizer"]["variants"])


def target_kept(cfg: dict, variant: str) -> int:
    return int(cfg["tokenizer"]["variants"][variant]["kept"])


def paper_k(cfg: dict, variant: str, kept: int) -> float:
    """The paper's kept count with the same kept fraction K / L (an int when exact, else a float)."""
    ours = cfg["tokenizer"]["variants"][variant]["tokens"]
    theirs = PAPER_TOKENS.get(variant)
    if theirs is None:
        return math.nan
    value = kept * theirs / ours
    return int(value) if float(value).is_integer() else value


def method_name(variant: str) -> str:
    return f"MergeVQ ({variant})"


def _intify(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Nullable integers so that token counts print as 144, not 144.0, beside empty cells."""
    for c in columns:
        if c in df and df[c].dropna().map(lambda v: float(v).is_integer()).all():
            df[c] = df[c].astype("Int64")
    return df


# ---------------------------------------------------------------------------------------------
# Protocol notes


def _describe_extractor(name: str) -> str:
    if name == "demo-classifier":
        return ("demo-classifier features (a small CNN trained on the digits' training split; "
                "not Inception-v3, so the values are not on the paper's scale)")
    if name in ("inception-v3-compat", "inception"):
        return "Inception-v3 pool3 features (torch-fidelity inception-v3-compat, 2048-d), as the paper"
    return f"{name} features"


def dataset_note(cfg: dict) -> str:
    data = cfg["data"]
    res = data["resolution"]
    if data["dataset"] == "digits":
        name = "scikit-learn digits (8x8 handwritten digits upsampled to RGB), its seeded validation split"
    else:
        name = f"ImageFolder at {data.get('root')} (validation split)"
    return f"Dataset: {name}; resolution {res}x{res}. Paper: ImageNet-1K validation, 256x256."


def fid_notes(records: list[dict]) -> list[str]:
    """rFID protocol of a set of sweep records: extractor, image count, the smoke label."""
    if not records:
        return ["rFID: no reconstruction metrics files were given."]
    protocols = [r.get("fid_protocol") or {} for r in records]
    extractors = sorted({str(p.get("extractor", "unknown")) for p in protocols})
    counts = sorted({int(p.get("num_images", r["num_images"])) for p, r in zip(protocols, records)})
    smoke = any(p.get("smoke", False) for p in protocols) or min(counts) < SMOKE_THRESHOLD
    refs = sorted({str(p["reference"]) for p in protocols if p.get("reference")})
    notes = [
        "rFID: Frechet distance between reconstructions and originals in "
        + "; ".join(_describe_extractor(e) for e in extractors)
        + f", on {', '.join(map(str, counts))} images"
        + (f", reference {', '.join(refs)}" if refs else "")
        + ". Paper: Inception-v3 on the 50,000 ImageNet validation images.",
        interval_note(records),
    ]
    if smoke:
        notes.append(
            f"**smoke**: rFID from fewer than {SMOKE_THRESHOLD} images is biased upwards and noisy "
            "(the feature covariance is poorly estimated); read it as a smoke test and compare "
            "trends across rows, not values with the paper.")
    return notes


def interval_note(records: list[dict]) -> str:
    """What rfid_ci_low/rfid_ci_high are: the interval method, level and resamples named in metrics.json."""
    found = set()
    for r in records:
        for which in ("rfid_gt", "rfid_pred"):
            cell = r.get(which) or {}
            boot = (r.get("fid_protocol") or {}).get("bootstrap") or {}
            found.add((cell.get("ci_method", "not recorded"), boot.get("description"), cell.get("ci_level"),
                       cell.get("resamples")))
    parts = []
    for method, description, level, resamples in sorted(found, key=str):
        text = f"{method}" + (f" ({description})" if description else "")
        if level is not None:
            text += f", {100 * level:g}% level"
        if resamples is not None:
            text += f", {resamples} resamples"
        parts.append(text)
    return ("rfid_ci_low/rfid_ci_high: the interval stored with each rFID in metrics.json: " + "; ".join(parts)
            + ". It brackets the FID expected from this many images, whose bias over FID at infinitely many "
            "images it keeps (as the paper's FID-50k does).")


def paper_k_note(cfg: dict, shown: Sequence[str]) -> str:
    parts = []
    for v in shown:
        ours = cfg["tokenizer"]["variants"][v]["tokens"]
        if v in PAPER_TOKENS:
            parts.append(f"{v}: L = {ours} here, {PAPER_TOKENS[v]} in the paper")
    same = all(cfg["tokenizer"]["variants"][v]["tokens"] == PAPER_TOKENS.get(v) for v in shown)
    return ("paper_k = K x L_paper / L_ours, the paper's kept count with the same kept fraction ("
            + "; ".join(parts) + "). Paper columns are filled only where the paper's table has "
            "exactly paper_k tokens"
            + (" (here paper_k = K)." if same else
               "; this config's K values are the paper's scaled by its token ratio."))


def _percent_scale_note() -> str:
    return "Accuracies and codebook usage in %; an empty cell means no metrics file (not evaluated)."


# ---------------------------------------------------------------------------------------------
# Table 1: linear probing and fine-tuning


def build_table1(probe_jsons: Sequence[str | Path], finetune_jsons: Sequence[str | Path],
                 paper_csv: str | Path, cfg: dict) -> Table:
    """One row per variant at its target K, then the random-init encoders and raw pixels.

    Columns: method, tokens, paper_tokens, linear_top1, finetune_top1, paper_linear_top1,
    paper_finetune_top1 (paper rows: MergeVQ (G+R), (R); G has none).
    """
    probes = read_metrics(probe_jsons, "probe")
    # The config's primary probe features fill `linear_top1`; every other feature kind probed
    # (eval.linear_probe.extra_features) gets a column `linear_top1_<kind>`, random-init rows too.
    primary = cfg["eval"]["linear_probe"]["features"]
    kinds = [primary] + sorted({p["features"] for p in probes
                                if p["encoder"] != "raw_pixels" and p["features"] != primary})
    column = {kind: "linear_top1" if kind == primary else f"linear_top1_{kind}" for kind in kinds}
    trained = _index([p for p in probes if p["encoder"] == "trained"],
                     lambda r: (r["variant"], r["kept"], r["features"]), "linear-probe")
    random_init = _index([p for p in probes if p["encoder"] == "random_init"],
                         lambda r: (r["variant"], r["features"]), "random-init probe")
    raw = _index([p for p in probes if p["encoder"] == "raw_pixels"], lambda r: "raw_pixels", "raw-pixel probe")
    finetune = _index(read_metrics(finetune_jsons, "finetune"), lambda r: r["variant"], "fine-tune")
    paper = pd.read_csv(paper_csv)

    def top1(record):
        return _fraction_to_percent(record["top1"], record["_path"], "top1") if record else math.nan

    def interval(record) -> dict:
        ci = record.get("top1_ci") if record else None
        return ({"linear_top1_ci_low": 100 * ci[0], "linear_top1_ci_high": 100 * ci[1]} if ci
                else {"linear_top1_ci_low": math.nan, "linear_top1_ci_high": math.nan})

    def gain(record, baseline) -> dict:
        """Paired bootstrap of trained minus random-init top-1 over the same val images."""
        cells = dict.fromkeys(("linear_gain_vs_random", "linear_gain_ci_low", "linear_gain_ci_high"), math.nan)
        if not (record and baseline and "val_correct" in record and "val_correct" in baseline):
            return cells
        if len(record["val_correct"]) != len(baseline["val_correct"]):
            raise ReportError(f"{record['_path']} and {baseline['_path']} score different numbers of val images "
                              f"({len(record['val_correct'])} vs {len(baseline['val_correct'])})")
        d, lo, hi = paired_bootstrap(record["val_correct"], baseline["val_correct"], seed=int(cfg["seed"]))
        return {"linear_gain_vs_random": 100 * d, "linear_gain_ci_low": 100 * lo, "linear_gain_ci_high": 100 * hi}

    rows = []
    for v in variants(cfg):
        k = target_kept(cfg, v)
        ft = finetune.get(v)
        if ft is not None and ft.get("kept") not in (None, k):
            raise ReportError(f"{ft['_path']}: fine-tuned at K={ft['kept']}, but {v}'s kept count is {k}")
        match = paper[paper["method"] == method_name(v)]
        rows.append({
            "method": method_name(v), "tokens": k,
            "paper_tokens": match["tokens"].iloc[0] if len(match) else math.nan,
            **{column[kind]: top1(trained.get((v, k, kind))) for kind in kinds},
            **interval(trained.get((v, k, primary))),
            **gain(trained.get((v, k, primary)), random_init.get((v, primary))),
            "finetune_top1": top1(ft),
            "paper_linear_top1": match["linear_top1"].iloc[0] if len(match) else math.nan,
            "paper_finetune_top1": match["finetune_top1"].iloc[0] if len(match) else math.nan,
        })
    for v in variants(cfg):
        first = next((random_init[(v, kind)] for kind in kinds if (v, kind) in random_init), None)
        rows.append({"method": f"{method_name(v)} encoder, random init",
                     "tokens": first["kept"] if first and first.get("kept") is not None else target_kept(cfg, v),
                     **{column[kind]: top1(random_init.get((v, kind))) for kind in kinds},
                     **interval(random_init.get((v, primary)))})
    rows.append({"method": "raw pixels", "linear_top1": top1(raw.get("raw_pixels")), **interval(raw.get("raw_pixels"))})
    columns = (["method", "tokens", "paper_tokens", "linear_top1", "linear_top1_ci_low", "linear_top1_ci_high",
                "linear_gain_vs_random", "linear_gain_ci_low", "linear_gain_ci_high"]
               + [column[kind] for kind in kinds if kind != primary]
               + ["finetune_top1", "paper_linear_top1", "paper_finetune_top1"])
    df = _intify(pd.DataFrame(rows, columns=columns), ["tokens", "paper_tokens"])

    notes = [dataset_note(cfg), _percent_scale_note()]
    if probes:
        feats = sorted({str(p.get("features")) for p in probes if p["encoder"] != "raw_pixels"})
        epochs = sorted({p["epochs"] for p in probes})
        sizes = sorted({(p["num_train"], p["num_val"]) for p in probes})
        notes.append(
            f"Linear probing: frozen features ({', '.join(feats) or 'none'}; linear_top1 = {primary}, "
            "the config's primary kind: tokens_mean = pre-quantisation merged tokens average-pooled, "
            "global = the encoder's CLS feature; the alignment loss (Eq. 12) trains "
            f"{'the CLS feature' if cfg['tokenizer']['loss'].get('align_feature', 'cls') == 'cls' else 'the averaged merged tokens'}"
            "), BN + linear layer "
            f"(MAE protocol), {', '.join(map(str, epochs))} epochs, "
            + ", ".join(f"{a} train / {b} val images" for a, b in sizes)
            + "; top-1 after the last epoch. tokens = K, the kept count the encoder merges to. "
            "linear_top1_ci_*: 95% percentile bootstrap over the val images; linear_gain_vs_random: "
            "top-1 minus that of the same architecture at random initialisation, with its paired "
            "bootstrap interval (both probes' per-image results resampled together).")
    if finetune:
        fts = list(finetune.values())
        notes.append(
            f"Fine-tuning: end-to-end, {', '.join(str(e) for e in sorted({f['epochs'] for f in fts}))} epochs, "
            + ", ".join(f"{a} train / {b} val images" for a, b in sorted({(f['num_train'], f['num_val']) for f in fts}))
            + "".join(f", peak lr {lr:g} (base lr x batch / base batch), layer-wise lr decay {d:g}"
                      for lr, d in sorted({(f["lr"], f["layer_decay"]) for f in fts if "lr" in f}))
            + ".")
    notes.append("Reference rows: the same probe on each variant's encoder at random initialisation, "
                 "and on raw pixels; they bound what the training added.")
    notes.append("Paper: ImageNet-1K, linear probing 90 epochs (MAE protocol), fine-tuning 100 epochs "
                 "(SimMIM protocol); paper_tokens is the paper's K for the variant. The paper's "
                 "Table 1 has no MergeVQ (G) row.")
    return Table(df, notes)


# ---------------------------------------------------------------------------------------------
# Table 2: reconstruction


def _rfid_cells(record: dict, which: str = "gt") -> dict:
    r = record[f"rfid_{which}"]
    return {"rfid": r["value"], "rfid_ci_low": r.get("ci_low", math.nan), "rfid_ci_high": r.get("ci_high", math.nan)}


def _sweep_index(records: list[dict]) -> dict:
    return _index(records, lambda r: (r["variant"], r["kept"]), "reconstruction")


def _at_target_kept(sweep_jsons: Sequence[str | Path], cfg: dict) -> tuple[list, list[tuple]]:
    """The sweep records read, and per variant (variant, K, paper_k, its record at K or None)."""
    sweep = _sweep_index(read_metrics(sweep_jsons, "sweep"))
    out = []
    for v in variants(cfg):
        k = target_kept(cfg, v)
        out.append((v, k, paper_k(cfg, v, k), sweep.get((v, k))))
    return [rec for *_, rec in out if rec is not None], out


def _none_to_nan(value) -> float:
    return math.nan if value is None else value


def build_table2(sweep_jsons: Sequence[str | Path], paper_csv: str | Path, cfg: dict) -> Table:
    """One row per variant at its target K: rFID (ground-truth S) with CI, codebook usage, PSNR,
    SSIM, LPIPS; paper rFID / usage from the MergeVQ row with the same method and paper_k tokens."""
    used, targets = _at_target_kept(sweep_jsons, cfg)
    paper = pd.read_csv(paper_csv)
    rows = []
    for v, k, pk, rec in targets:
        match = paper[(paper["method"] == method_name(v)) & (paper["tokens"] == pk)]
        row = {"method": method_name(v), "tokens": k, "paper_k": pk}
        if rec is not None:
            row.update(_rfid_cells(rec))
            row.update({"codebook_usage_percent": _fraction_to_percent(rec["codebook_usage"], rec["_path"], "codebook_usage"),
                        "psnr": rec["psnr_gt"], "ssim": rec["ssim_gt"], "lpips": _none_to_nan(rec.get("lpips_gt"))})
        row.update({"paper_rfid": match["rfid"].iloc[0] if len(match) else math.nan,
                    "paper_usage_percent": match["usage_percent"].iloc[0] if len(match) else math.nan})
        rows.append(row)
    columns = ["method", "tokens", "paper_k", "rfid", "rfid_ci_low", "rfid_ci_high", "codebook_usage_percent",
               "psnr", "ssim", "lpips", "paper_rfid", "paper_usage_percent"]
    df = _intify(pd.DataFrame(rows, columns=columns), ["tokens", "paper_k"])
    bits = cfg["tokenizer"]["codebook_bits"]
    notes = [dataset_note(cfg), *fid_notes(used),
             "Reconstructions decode with the encoder's source matrix S (Table 5 has S_hat); "
             "PSNR in dB, SSIM and LPIPS per image, averaged"
             + ("; LPIPS empty: off in this config (no VGG16 weights)." if df["lpips"].isna().all() and used else "."),
             f"Codebook usage: share of the 2^{bits} LFQ codes used on the validation set, % "
             "(the paper: 2^18 codes).",
             paper_k_note(cfg, variants(cfg)),
             _percent_scale_note()]
    return Table(df, notes)


# ---------------------------------------------------------------------------------------------
# Table 4: the kept-count sweep

# Table 4's paper columns per variant: our column -> table4.csv column (README "How we read Table 4").
PAPER_TABLE4 = {
    "G": {"paper_rfid": "g_rfid"},
    "G+R": {"paper_rfid": "gr_rfid", "paper_steps": "gr_steps", "paper_linear_top1": "gr_acc",
            "paper_gflops": "gr_flops_g"},
    "R": {"paper_linear_top1": "r_acc"},
}


INFERENCE_SWEEP = "inference sweep"
TRAINED_PER_K = "trained at K"


def build_table4(sweep_jsons: Sequence[str | Path], probe_jsons: Sequence[str | Path],
                 paper_csv: str | Path, cfg: dict) -> Table:
    """One row per (variant, K) of the sweep: rFID (with CI), PSNR, linear-probe top-1 at that K,
    encoder/decoder GMACs, tokens per image; paper values at paper_k from Table 4."""
    all_records = read_metrics(sweep_jsons, "sweep")
    # Two protocols: the inference sweep (one tokenizer, K changed at inference: Fig. 3) and, where
    # `train_per_kept` is on, one tokenizer trained per K (the records carry `trained_for_kept`).
    records = [r for r in all_records if r.get("trained_for_kept") is None]
    per_kept = _index([r for r in all_records if r.get("trained_for_kept") is not None],
                      lambda r: (r["variant"], r["kept"]), "per-K sweep")
    sweep = _sweep_index(records)
    probes = [p for p in read_metrics(probe_jsons, "probe") if p["encoder"] == "trained"]
    trained = _index([p for p in probes if p.get("trained_for_kept") is None],
                     lambda r: (r["variant"], r["kept"]), "linear-probe")
    per_kept_probe = _index([p for p in probes if p.get("trained_for_kept") is not None],
                            lambda r: (r["variant"], r["kept"]), "per-K linear-probe")
    paper = pd.read_csv(paper_csv)
    order = {v: i for i, v in enumerate(variants(cfg))}
    for key, rec in [*sweep.items(), *trained.items()]:
        if key[0] not in order:
            raise ReportError(f"{rec['_path']}: variant {key[0]!r} is not in the config ({list(order)})")
    for v in order:  # a sweep is one tokenizer evaluated at several K (Fig. 3's protocol)
        shas = {r.get("tokenizer_sha256") for (rv, _), r in sweep.items() if rv == v}
        if len(shas) > 1:
            raise ReportError(f"the {v} sweep mixes tokenizers (sha256 {sorted(map(str, shas))}); "
                              "re-run the sweep so that all K come from one tokenizer")

    rows = []
    protocols = [(INFERENCE_SWEEP, sweep, trained)]
    if per_kept or per_kept_probe:
        # at its own target K the main tokenizer is the per-K one (same settings; not retrained)
        with_per_kept = {v for v, _ in [*per_kept, *per_kept_probe]}
        targets = {v: target_kept(cfg, v) for v in with_per_kept}
        per_kept = {**{(v, k): sweep[(v, k)] for v, k in targets.items() if (v, k) in sweep}, **per_kept}
        per_kept_probe = {**{(v, k): trained[(v, k)] for v, k in targets.items() if (v, k) in trained},
                          **per_kept_probe}
        protocols.append((TRAINED_PER_K, per_kept, per_kept_probe))
    for protocol, sweep_at, probe_at in protocols:
        for v, k in sorted(set(sweep_at) | set(probe_at), key=lambda vk: (order[vk[0]], -vk[1])):
            rec, probe = sweep_at.get((v, k)), probe_at.get((v, k))
            pk = paper_k(cfg, v, k)
            row = {"variant": v, "protocol": protocol, "tokens": k, "paper_k": pk}
            if rec is not None:
                row.update(_rfid_cells(rec))
                hat = "ft" if "rfid_ft" in rec else "pred"  # the fine-tuned recovery's S_hat when evaluated
                row.update({"psnr": rec["psnr_gt"], "rfid_s_hat": rec[f"rfid_{hat}"]["value"],
                            "psnr_s_hat": rec[f"psnr_{hat}"], "encoder_gmacs": rec["encoder_gmacs"],
                            "decoder_gmacs": rec["decoder_gmacs"],
                            "gmacs": rec["encoder_gmacs"] + rec["decoder_gmacs"],
                            "tokens_per_image": rec["tokens_per_image"]})
            if probe is not None:
                row["linear_top1"] = _fraction_to_percent(probe["top1"], probe["_path"], "top1")
            match = paper[paper["tokens"] == pk]
            for ours, theirs in PAPER_TABLE4.get(v, {}).items():
                row[ours] = match[theirs].iloc[0] if len(match) else math.nan
            rows.append(row)
    columns = ["variant", "protocol", "tokens", "paper_k", "rfid", "rfid_ci_low", "rfid_ci_high", "psnr", "rfid_s_hat",
               "psnr_s_hat", "linear_top1", "encoder_gmacs", "decoder_gmacs", "gmacs", "tokens_per_image",
               "paper_rfid", "paper_linear_top1", "paper_steps", "paper_gflops"]
    df = _intify(pd.DataFrame(rows, columns=columns), ["tokens", "paper_k", "tokens_per_image", "paper_steps"])

    res = cfg["data"]["resolution"]
    counted = df.dropna(subset=["tokens_per_image"])
    tokens_equal_k = bool(len(counted)) and bool((counted["tokens_per_image"] == counted["tokens"]).all())
    shown = [v for v in order if v in set(df["variant"])]
    notes = [
        dataset_note(cfg),
        f"protocol '{INFERENCE_SWEEP}': one tokenizer per variant, trained with its merge-ratio sampler "
        "around its kept count, evaluated at every K of its sweep by changing the kept count at inference "
        f"(Fig. 3's caption). protocol '{TRAINED_PER_K}' (rows only where `train_per_kept` is on): one "
        "tokenizer per K, its sampler moved to sit around that K (`train-tokenizer --kept K`; at the "
        "variant's own target K the main tokenizer), as the paper's Table 4 caption reads ('the number of "
        "kept tokens during training')."
        + ("" if len(protocols) > 1 else " Only the inference sweep was run (train_per_kept is off)."),
        *fid_notes([r for r in records if r["variant"] in order]),
        "rfid / psnr: with the encoder's S, as the paper's Table 4; rfid_s_hat / psnr_s_hat beside them: with "
        "Source Recovery's S_hat (the fine-tuned recovery's where the sweep was scored with `--recovery`, else "
        "the stage-1 recovery's; Table 5 gives both).",
        "linear_top1: linear probe on the frozen encoder's features at that K; empty where no probe "
        "file exists. The paper's Acc. column (48.6-54.3) comes from a shorter ablation schedule than "
        "Table 1 and is not comparable with it.",
        f"GMACs: multiply-accumulates x 1e9 per image at {res}x{res}, encoder + decoder (Source "
        "Recovery not counted), fvcore's convention that Table A1 calls FLOPs. paper_gflops is Table "
        "4's FLOPs column (256x256), which does not match Table A1's encoder + decoder sum "
        "(results/paper/README.md, caveat (i)).",
        "tokens_per_image: the K code tokens that represent one image, i.e. what a stage-2 generator "
        "produces per image (K steps for a raster autoregressive model at one token per step)"
        + (", K in every row." if tokens_equal_k else " (as stored in metrics.json).")
        + " paper_steps is the paper's '#Step' column, which prints K/4 (64 at 256 tokens, 36 at 144): "
        "it counts generation steps of the paper's generator at 4 tokens per step (our reading; the "
        "paper does not define it), so it is not comparable with tokens_per_image.",
        paper_k_note(cfg, shown),
        "Paper columns: rFID from G's column (G rows) or G+R's (G+R rows); steps, Acc. and FLOPs from "
        "G+R's; R's only value is Acc. 54.3 at 36 tokens (README's reading of the garbled table).",
        _percent_scale_note(),
    ]
    return Table(df, notes)


# ---------------------------------------------------------------------------------------------
# Table 5: stage-1 rows (source recovery)


def build_table5(sweep_jsons: Sequence[str | Path], paper_csv: str | Path, cfg: dict) -> Table:
    """Two rows per variant at its target K: decoding with the encoder's S and with Source
    Recovery's S_hat (rFID with CI, PSNR, SSIM; source accuracy with its chance level and the
    position-only baseline on the S_hat row). Paper rFID from the stage-1 rows of Table 5."""
    used, targets = _at_target_kept(sweep_jsons, cfg)
    paper = pd.read_csv(paper_csv)
    rows = []
    for v, k, pk, rec in targets:
        kinds = [(RECOVERY_GT, "gt"), (RECOVERY_PRED, "pred")]
        if rec is not None and "rfid_ft" in rec:  # evaluated with `--recovery` (finetune-recovery)
            kinds.append((RECOVERY_FT, "ft"))
        for label, which in kinds:
            row = {"version": f"({v})", "recovery": label, "tokens": k, "paper_k": pk}
            if rec is not None:
                row.update(_rfid_cells(rec, which))
                row.update({"psnr": rec[f"psnr_{which}"], "ssim": rec[f"ssim_{which}"]})
                top1 = rec.get(f"classifier_top1_recon_{which}")
                if top1 is not None:
                    row["classifier_top1"] = _fraction_to_percent(top1, rec["_path"], f"classifier_top1_recon_{which}")
                if which != "gt":
                    accuracy = "source_accuracy" if which == "pred" else "source_accuracy_ft"
                    row["source_accuracy"] = _fraction_to_percent(rec[accuracy], rec["_path"], accuracy)
                    row.update({key: _fraction_to_percent(rec[key], rec["_path"], key)
                                for key in ("source_accuracy_chance", "source_accuracy_position_baseline")})
            match = paper[(paper["version"] == f"({v})") & (paper["recovery"] == PAPER_RECOVERY[label])
                          & (paper["generator"] == "none") & (paper["tokens"] == pk)]
            row["paper_rfid"] = match["rfid"].iloc[0] if len(match) else math.nan
            rows.append(row)
    columns = ["version", "recovery", "tokens", "paper_k", "rfid", "rfid_ci_low", "rfid_ci_high", "psnr", "ssim",
               "classifier_top1", "source_accuracy", "source_accuracy_chance", "source_accuracy_position_baseline",
               "paper_rfid"]
    df = _intify(pd.DataFrame(rows, columns=columns), ["tokens", "paper_k"])
    if df["classifier_top1"].isna().all():
        df = df.drop(columns="classifier_top1")  # the Inception extractor has no classifier
    originals = [r["classifier_top1_original"] for r in used if r.get("classifier_top1_original") is not None]
    notes = [
        dataset_note(cfg), *fid_notes(used),
        f"'{RECOVERY_GT}': token recovery (Eq. 14) with the encoder's source matrix; "
        f"'{RECOVERY_PRED}': with the stage-1 Source Recovery's S_hat (Eq. 10's argmax taken over the "
        "canonical source matrices, tokenizer.recovery.canonical_owners), compared with the paper's "
        "'2-layer Cross-Attention' row (Source Recovery, Table A2); "
        f"'{RECOVERY_FT}': with the S_hat of the recovery after `mergevq finetune-recovery` (App. A.2), "
        "decoded by the decoder that run fine-tuned on S_hat when generator.recovery_finetune.finetune_decoder "
        "is on (the S rows keep the stage-1 decoder).",
        *([f"classifier_top1: the demo classifier's top-1 on the reconstructions, %; on the originals "
           f"{100 * originals[0]:.1f}%."] if originals and "classifier_top1" in df else []),
        "source_accuracy: agreement of S_hat with S over the L positions, %, with its chance level "
        "(source_accuracy_chance) and the accuracy of a predictor that uses the position only "
        "(source_accuracy_position_baseline), as `mergevq evaluate` stores them; both are floors "
        "that Source Recovery has to beat to use the token content.",
        paper_k_note(cfg, variants(cfg)),
        "Stage-1 rows (generator 'none') compare rFID; the paper reports them for (G+R) only. The "
        "generator rows, when given, follow (see their notes).",
    ]
    return Table(df, notes)


# ---------------------------------------------------------------------------------------------
# Stage 2: Table 3 and the generator rows of Table 5 (inputs: `mergevq generation-metrics` files of
# the final sample sets, one per (generator, tokenizer variant))

# Our generator kind -> the paper's generator name in Table 3 / Table 5 rows of the same method.
PAPER_GENERATOR = {"llamagen": "LlamaGen-L", "mergear": "MergeAR (Ours)", "randar": "RandAR-L-cfg"}
GENERATOR_LABEL = {"llamagen": "LlamaGen", "mergear": "MergeAR", "randar": "RandAR"}
GENERATOR_TYPE = {"llamagen": "AR (raster)", "mergear": "AR (raster)", "randar": "AR (random)"}


def generated_tokens(kind: str, cfg: dict, variant: str) -> int:
    """Codes a generator emits per image: L (LlamaGen, MergeAR: raster over the grid), K (RandAR)."""
    v = cfg["tokenizer"]["variants"][variant]
    return int(v["kept"] if kind == "randar" else v["tokens"])


def decoding_steps(kind: str, r: dict, cfg: dict, variant: str) -> int:
    """Our decoding steps: one code per step (LlamaGen, MergeAR), RandAR's parallel schedule's T."""
    if kind == "randar":
        return int(r["settings"]["generate"]["steps"])
    return generated_tokens(kind, cfg, variant)


def _generation_index(records: list[dict], cfg: dict) -> dict:
    """{(generator kind, tokenizer variant): record}, refusing two records of one pair."""
    out = {}
    for r in records:
        name = r.get("generator_name") or ""
        kind, _, variant = name.partition("_")
        if kind not in PAPER_GENERATOR or variant not in cfg["tokenizer"]["variants"]:
            raise ReportError(f"{r['_path']}: generator {name!r} is not a (generator, variant) pair of this config")
        if (kind, variant) in out:
            raise ReportError(f"two generation files for {name}: {out[(kind, variant)]['_path']} and {r['_path']}")
        out[(kind, variant)] = r
    return out


def _generation_cells(r: dict) -> dict:
    cc = r.get("class_consistency") or {}
    mem = r.get("memorisation") or {}
    return {"gfid": r["gfid"], "is": r.get("is"), "cfg_scale": r["settings"]["cfg_scale"],
            "num_samples": r["num_samples"], "params_m": (r.get("generator_params") or math.nan) / 1e6,
            "class_consistency": 100 * cc["top1"] if cc else math.nan,
            "near_duplicate_percent": 100 * mem["samples"]["near_duplicate_share"] if mem else math.nan,
            "val_near_duplicate_percent": 100 * mem["validation"]["near_duplicate_share"] if mem else math.nan}


def generation_notes(records: list[dict], cfg: dict) -> list[str]:
    """gFID protocol, the CFG sweep behind each chosen scale, class consistency and memorisation."""
    if not records:
        return ["Ours: no generation metrics files were given (no generator trained in this config); "
                "rows without a file are absent, never filled in."]
    protocols = [r.get("fid_protocol") or {} for r in records]
    extractors = sorted({str(p.get("extractor", "unknown")) for p in protocols})
    refs = sorted({str(p.get("reference")) for p in protocols if p.get("reference")})
    counts = sorted({int(r["num_samples"]) for r in records})
    notes = ["gFID / IS of " + ", ".join(map(str, counts)) + " class-conditional samples (classes in equal "
             "numbers) in " + "; ".join(_describe_extractor(e) for e in extractors)
             + (f", against {', '.join(refs)}" if refs else "")
             + ". Paper: Inception-v3, 50,000 samples against ADM's ImageNet 256 reference batch."]
    if any(r.get("smoke") for r in records):
        notes.append(f"**smoke**: gFID from fewer than {SMOKE_THRESHOLD} images (or a reference of fewer) is "
                     "biased upwards and noisy; compare trends, not values with the paper. IS from the demo "
                     "classifier's 10 classes is at most 10.")
    for r in records:
        sweep = r.get("cfg_sweep") or []
        s = r["settings"]
        ramp = (r.get("generator_kind") == "randar"
                and (s.get("generate") or {}).get("cfg_schedule") == "linear")
        text = (f"{r['generator_name']}: {'CFG ramped linearly from 1 to' if ramp else 'constant CFG scale'} "
                f"{s['cfg_scale']:g} (lowest gFID of the sweep), "
                f"temperature {s['temperature']:g}, top-k {s['top_k']}, top-p {s['top_p']}")
        if sweep:
            cells = []
            for row in sweep:
                cell = f"{row['cfg_scale']:g}: gFID {row['gfid']:.3g}"
                if row.get("class_consistency"):
                    cell += f", class consistency {100 * row['class_consistency']['top1']:.1f}%"
                cells.append(cell)
            text += "; sweep (" + str(len(sweep)) + " scales, fewer samples each) " + "; ".join(cells)
        notes.append(text + ".")
    if any(r.get("class_consistency") for r in records):
        notes.append("class_consistency: the demo classifier's top-1 on the samples against the class each was "
                     "asked for, % (chance 10%).")
    for r in records:
        mc = r.get("mergear_cache")
        if mc:
            notes.append(f"{r['generator_name']}: pruned KV cache while sampling: {mc['kept_mean']:.1f} distinct codes "
                         f"kept of {mc['sequence_length'] - 1} inputs on average, {mc['mean_cache_entries']:.1f} "
                         f"entries per step (full cache: {2 + mc['sequence_length'] / 2:.1f}), "
                         f"{mc['samples_over_k']} of {mc['samples']} samples kept more than K, "
                         f"{mc['batches_grown']} buffer growths.")
    for r in records:
        sc = r.get("source_check")
        if sc:
            notes.append(f"{r['generator_name']}: S_hat check, the same generated codes decoded with S_hat / the "
                         f"position-only baseline's S / a random training image's S: class consistency "
                         f"{100 * sc['s_hat']:.1f}% / {100 * sc['position_baseline']:.1f}% / "
                         f"{100 * sc['random_training_s']:.1f}%.")
    mems = [r["memorisation"] for r in records if r.get("memorisation")]
    if mems:
        m = mems[0]
        notes.append(
            "Memorisation: nearest training code sequence of each sample by Hamming distance; "
            f"near_duplicate_percent counts samples at most as far as the closest {100 * m['near_duplicate_quantile']:g}% "
            "of validation sequences are (val_near_duplicate_percent, the rate of held-out real images); "
            + "; ".join(f"{r['generator_name']}: nearest distance {r['memorisation']['samples']['nearest_distance_mean']:.2f} "
                        f"of positions (validation {r['memorisation']['validation']['nearest_distance_mean']:.2f}), "
                        f"exact copies {100 * r['memorisation']['samples']['exact_copy_share']:.1f}%, "
                        f"{100 * r['memorisation']['distinct_share']:.1f}% distinct sequences"
                        for r in records if r.get("memorisation")) + ".")
    return notes


def build_table3(generation_jsons: Sequence[str | Path], paper_csv: str | Path, cfg: dict) -> Table:
    """The paper's Table 3 rows with ours beside the rows we reproduce (MergeVQ tokenizer + the same
    generator, at the paper's steps scaled like its tokens), and our runs that have no paper row."""
    records = read_metrics(generation_jsons, "generation")
    ours = _generation_index(records, cfg)
    paper = pd.read_csv(paper_csv)
    rows, used = [], set()
    for _, p in paper.iterrows():
        row = {"type": p["type"], "tokenizer": p["tokenizer"], "generator": p["generator"],
               "paper_params_m": p["params"], "paper_steps": p["steps"], "paper_gfid": p["gfid"], "paper_is": p["is"]}
        for (kind, v), r in ours.items():
            tokens = cfg["tokenizer"]["variants"][v]["tokens"]
            # raster rows match at the paper's steps scaled like the grid; RandAR's one row per tokenizer
            # (its steps T are the schedule's, Table 3's 64 for N = 144 scaled with N here)
            if (p["tokenizer"] == method_name(v) and p["generator"] == PAPER_GENERATOR[kind]
                    and (kind == "randar" or p["steps"] == paper_k(cfg, v, tokens))):
                row.update(steps=decoding_steps(kind, r, cfg, v), **_generation_cells(r))
                used.add((kind, v))
        rows.append(row)
    for (kind, v), r in ours.items():  # e.g. (G)+LlamaGen: Table 5 has its paper gFID, Table 3 no row
        if (kind, v) not in used:
            rows.append({"type": GENERATOR_TYPE[kind], "tokenizer": method_name(v), "generator": GENERATOR_LABEL[kind],
                         "steps": decoding_steps(kind, r, cfg, v), **_generation_cells(r)})
    columns = ["type", "tokenizer", "generator", "paper_params_m", "paper_steps", "paper_gfid", "paper_is", "steps",
               "params_m", "gfid", "is", "cfg_scale", "num_samples", "class_consistency", "near_duplicate_percent",
               "val_near_duplicate_percent"]
    df = _intify(pd.DataFrame(rows, columns=columns), ["paper_steps", "steps", "num_samples"])
    shown = sorted({v for _, v in ours}, key=list(cfg["tokenizer"]["variants"]).index)
    data = cfg["data"]
    notes = [f"Generation: class-conditional, {data['num_classes']} classes of {data['dataset']} at "
             f"{data['resolution']}x{data['resolution']}; generators are trained on the tokenizer's codes of the "
             "training images. Paper: ImageNet-1K, 1,000 classes, 256x256.",
             "Paper columns: Table 3 as printed (params in millions; steps = decoding steps). Ours fill the "
             "rows with our tokenizer and generator; a row without ours has no trained generator in this "
             "config (never filled in).",
             "steps: our decoding steps. LlamaGen (at K = L, as the authors' stage-2 configs) and MergeAR "
             "(sampled at the variant's target K, its M(K); pruned KV cache) emit one code per step over the L "
             "grid positions, matched with the paper's row of the same tokenizer, generator and steps at the "
             "same share of the grid; RandAR emits the K merged codes in its parallel schedule's T steps "
             "(decode_steps; Table 3's 64 for N = 144, 88 for N = 256, scaled with N) with the CFG scale "
             "ramped linearly from 1, and Source Recovery's S_hat places them (" + "; ".join(
                 f"{v}: L = {cfg['tokenizer']['variants'][v]['tokens']} here, {PAPER_TOKENS.get(v)} in the paper"
                 for v in shown) + ").",
             *generation_notes(list(ours.values()), cfg)]
    return Table(df, notes)


def add_generator_rows_table5(table: Table, generation_jsons: Sequence[str | Path], paper_csv: str | Path,
                              cfg: dict) -> Table:
    """Table 5's generator rows "(V)+LlamaGen", "(V)+MergeAR" (no recovery: the generator emits all L
    positions) and "(V)+RandAR" (K merged codes placed by the fine-tuned Source Recovery's S_hat),
    gFID ours beside the paper's, appended to the stage-1 rows."""
    records = read_metrics(generation_jsons, "generation")
    ours = _generation_index(records, cfg)
    paper = pd.read_csv(paper_csv)
    rows = []
    for v in variants(cfg):
        for kind in PAPER_GENERATOR:
            r = ours.get((kind, v))
            tokens = generated_tokens(kind, cfg, v)
            pk = paper_k(cfg, v, tokens)
            version = f"({v})+{GENERATOR_LABEL[kind]}"
            match = paper[(paper["version"] == version) & (paper["tokens"] == pk)]
            if r is None and not len(match):
                continue
            recovery = "fine-tuned Source Recovery" if kind == "randar" else "none"
            row = {"version": version, "recovery": recovery, "tokens": tokens, "paper_k": pk,
                   "paper_gfid": match["gfid"].iloc[0] if len(match) else math.nan}
            if r is not None:
                row["gfid"] = r["gfid"]
            rows.append(row)
    if not rows:
        return table
    frame = pd.concat([table.frame, pd.DataFrame(rows)], ignore_index=True)
    columns = list(table.frame.columns) + [c for c in ("gfid", "paper_gfid") if c not in table.frame.columns]
    frame = _intify(frame.reindex(columns=columns), ["tokens", "paper_k"])
    notes = table.notes + ["Generator rows: gFID of class-conditional samples at the CFG scale of the lowest "
                           "sweep gFID. LlamaGen trains on the codes at K = L; MergeAR on the L per-position "
                           "codes at K drawn per image (stage-2 sampler) and samples at the target K (tokens = "
                           "the L codes it emits; no recovery); RandAR on the target K merged codes, decoded "
                           "through the fine-tuned Source Recovery's S_hat (tokens = K). A paper row without "
                           "ours has no trained generator here."]
    notes += generation_notes(list(ours.values()), cfg)
    return Table(frame, notes)


# ---------------------------------------------------------------------------------------------
# Writing


def to_markdown(table: Table, title: str | None = None) -> str:
    """Markdown: optional title, the table (empty cells as an em dash), then the notes as a list."""
    shown = table.frame.astype(object).where(table.frame.notna(), None)
    body = shown.to_markdown(index=False, floatfmt=".4g", missingval="—")
    parts = ([f"# {title}", ""] if title else []) + [body, "", "Notes:", ""]
    parts += [f"- {n}" for n in table.notes]
    return "\n".join(parts) + "\n"


def write_table(df: pd.DataFrame, notes: list[str], csv_path: str | Path, title: str | None = None) -> Path:
    """Write ``csv_path`` (data only) and its ``.md`` twin (table + notes), each atomically."""
    from mergevq.files import write_text

    csv_path = Path(csv_path)
    write_text(csv_path, df.to_csv(index=False, float_format="%.6g"))
    md_path = csv_path.with_suffix(".md")
    write_text(md_path, to_markdown(Table(df, notes), title))
    return md_path


def build(name: str, inputs: Sequence[str | Path], cfg: dict, paper_csv: str | Path | None = None) -> Table:
    """Build table ``name`` from metric files of any kind (they are sorted by their content)."""
    if name not in TABLES:
        raise ReportError(f"unknown table {name!r}; tables: {', '.join(TABLES)}")
    paper_csv = Path(paper_csv) if paper_csv else PAPER_DIR / f"{name}.csv"
    groups = sort_inputs(inputs)
    if name == "table1":
        return build_table1(groups["probe"], groups["finetune"], paper_csv, cfg)
    if name == "table2":
        return build_table2(groups["sweep"], paper_csv, cfg)
    if name == "table3":
        return build_table3(groups["generation"], paper_csv, cfg)
    if name == "table4":
        return build_table4(groups["sweep"], groups["probe"], paper_csv, cfg)
    table = build_table5(groups["sweep"], paper_csv, cfg)
    return add_generator_rows_table5(table, groups["generation"], paper_csv, cfg)


# ---------------------------------------------------------------------------------------------
# Command line: mergevq table NAME --config C --inputs FILES... --out results/{run}/tables/NAME.csv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=TABLES, help="which table")
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--inputs", nargs="*", default=[], metavar="JSON",
                        help="metrics.json files of any kind (sweep, probe, fine-tune); sorted by content")
    parser.add_argument("--paper", default=None, help="paper CSV (default results/paper/NAME.csv)")
    parser.add_argument("--out", required=True, help="output CSV; the Markdown twin goes beside it (.md)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from mergevq.config import load_config

    cfg = load_config(args.config, args.set)
    table = build(args.name, args.inputs, cfg, args.paper)
    md = write_table(table.frame, table.notes, args.out, TITLES[args.name])
    print(f"wrote {args.out} and {md}")
    return 0
