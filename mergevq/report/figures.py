"""Figures 3, 4, 5 and A1 of the paper, drawn from our metric files, configs and tokenizers.

* ``fig3_tradeoff``          rFID and linear-probe top-1 against the kept count K (Fig. 3).
* ``fig4_merge_maps``        which kept token covers each position, at several K (Fig. 4).
* ``fig5_merge_sampling``    the merge-ratio sampler's distribution of K per variant (Fig. 5),
                             with an empirical histogram of the sampler's own draws over it.
* ``figA1_reconstructions``  originals and reconstructions (with S and S_hat) at each K (Fig. A1).
* ``figA2_samples``          class-conditional samples, one panel per generator, rows = classes (Fig. A2).

Every function writes one PNG atomically and takes explicit inputs (paths, a config dict, loaded
models), so the Snakefile or a test can call it directly; ``mergevq figure NAME`` wraps them.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mergevq.files import atomic_path  # noqa: E402
from mergevq.report.tables import (SMOKE_THRESHOLD, read_metrics, sort_inputs,  # noqa: E402
                                   target_kept, variants)

FIGURES = ("fig3_tradeoff", "fig4_merge_maps", "fig5_merge_sampling", "figA1_reconstructions", "figA2_samples")
COLORS = {"G": "tab:blue", "G+R": "tab:orange", "R": "tab:green"}


def _save(fig, path: str | Path, dpi: int = 150) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def _to_hwc(image) -> np.ndarray:
    """(3, H, W) tensor in [-1, 1] -> (H, W, 3) float array in [0, 1]."""
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------
# Fig. 3: the kept-count trade-off


def fig3_tradeoff(sweep_jsons: Sequence[str | Path], probe_jsons: Sequence[str | Path], cfg: dict,
                  path: str | Path) -> Path:
    """Left: rFID (ground-truth S) against K with the CI as error bars, and dashed the rFID with
    Source Recovery's S_hat (the fine-tuned recovery's when scored); right: linear-probe top-1
    against K. One line per variant; each variant's training kept count is ringed."""
    sweep = read_metrics(sweep_jsons, "sweep")
    probes = [p for p in read_metrics(probe_jsons, "probe") if p["encoder"] == "trained"]
    fig, (ax_r, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    smoke = False
    for v in variants(cfg):
        color, target = COLORS.get(v), target_kept(cfg, v)
        recs = sorted((r for r in sweep if r["variant"] == v), key=lambda r: r["kept"])
        if recs:
            k = np.array([r["kept"] for r in recs])
            val = np.array([r["rfid_gt"]["value"] for r in recs])
            lo = np.array([r["rfid_gt"].get("ci_low", np.nan) for r in recs], dtype=float)
            hi = np.array([r["rfid_gt"].get("ci_high", np.nan) for r in recs], dtype=float)
            yerr = np.nan_to_num(np.stack([val - lo, hi - val]).clip(min=0))
            ax_r.errorbar(k, val, yerr=yerr, marker="o", capsize=3, color=color, label=f"MergeVQ ({v})")
            ax_r.scatter([k[k == target]], [val[k == target]], s=160, facecolors="none", edgecolors=color)
            hat = "ft" if all("rfid_ft" in r for r in recs) else "pred"  # S_hat alongside, dashed
            ax_r.plot(k, [r[f"rfid_{hat}"]["value"] for r in recs], linestyle="--", marker=".", color=color,
                      alpha=0.7, label=f"({v}) with S_hat" + (" (fine-tuned recovery)" if hat == "ft" else ""))
            smoke |= any((r.get("fid_protocol") or {}).get("smoke", False) or r["num_images"] < SMOKE_THRESHOLD
                         for r in recs)
        ps = sorted((p for p in probes if p["variant"] == v), key=lambda p: p["kept"])
        if ps:
            k = np.array([p["kept"] for p in ps])
            acc = 100 * np.array([p["top1"] for p in ps])
            ax_p.plot(k, acc, marker="o", color=color, label=f"MergeVQ ({v})")
            ax_p.scatter([k[k == target]], [acc[k == target]], s=160, facecolors="none", edgecolors=color)
    extractor = sorted({str((r.get("fid_protocol") or {}).get("extractor", "?")) for r in sweep})
    ax_r.set(xlabel="kept tokens K (inference)", ylabel="rFID (lower is better)",
             title=f"Reconstruction ({', '.join(extractor) or 'no data'})" + (" [smoke]" if smoke else ""))
    ax_p.set(xlabel="kept tokens K (inference)", ylabel="linear-probe top-1 (%)", title="Representation")
    for ax in (ax_r, ax_p):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle("Fig. 3: kept tokens vs reconstruction and representation "
                 "(one tokenizer per variant; ring = training kept count)")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Fig. 5: merge-ratio sampling


def fig5_merge_sampling(cfg: dict, path: str | Path, steps: int = 5000, seed: int | None = None) -> Path:
    """One panel per variant: P(K) of its `merge_sampling` config as bars, and the share of
    `sample(step, seed)` draws over `steps` training steps as markers (the trainer's own draws)."""
    from mergevq.data.merge_sampling import MergeRatioSampler

    seed = cfg.get("seed", 0) if seed is None else seed
    names = variants(cfg)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, v in zip(axes[0], names):
        var = cfg["tokenizer"]["variants"][v]
        ms = var["merge_sampling"]
        sampler = MergeRatioSampler.from_config(ms)
        probs = sampler.probabilities()
        ks = list(probs)
        draws = np.array([sampler.sample(step, seed) for step in range(steps)])
        empirical = [(draws == k).mean() for k in ks]
        x = np.arange(len(ks))  # K are squares, unevenly spaced: one slot each, as Fig. 5
        ax.bar(x, [probs[k] for k in ks], color=COLORS.get(v), alpha=0.7,
               label="P(K) (Eq. 19/20 + floor)" if ms.get("floor") else "P(K) (Eq. 19/20)")
        ax.plot(x, empirical, "k_", markersize=18, markeredgewidth=2, label=f"share of {steps} draws")
        ax.set_ylim(0, 1.3 * max(max(probs.values()), max(empirical)))  # room for the legend
        ax.set_xticks(x, [str(k) for k in ks], rotation=45 if len(ks) > 6 else 0)
        ax.set(xlabel=f"kept tokens K (of {var['tokens']})", ylabel="probability",
               title=f"MergeVQ ({v}): {ms['distribution']}" + (f", floor {ms['floor']:g}" if ms.get("floor") else "")
                     + f"\nK=({ms['k0']}+T)^2 in [{ms['k_min']}, {ms['k_max']}]")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 5: merge-ratio sampling in stage-1 training", y=1.04)  # above the two-line titles
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Fig. 4: merge maps


def owner_map(source) -> np.ndarray:
    """source S (B, K, L) binary -> (B, grid, grid) int: the kept token that covers each position."""
    B, K, L = source.shape
    grid = int(round(L ** 0.5))
    if grid * grid != L:
        raise ValueError(f"owner_map: L={L} positions do not form a square grid")
    owner = source.float().argmax(dim=1)  # (B, L): each position belongs to one merged token
    return owner.reshape(B, grid, grid).cpu().numpy()


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W) bool, True where a neighbour to the right or below differs."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def _display_size(resolution: int) -> int:
    """Upsample small images for display so that 1-px token boundaries stay thin."""
    return resolution * max(1, -(-128 // resolution))


def fig4_merge_maps(model, images, kept_counts: Sequence[int], path: str | Path, device="cpu",
                    title: str | None = None) -> Path:
    """Rows = images (B, 3, H, W in [-1, 1]); columns = the image, then for each K the positions
    coloured by the kept token that covers them (from ``model.encode(images, K).source``), over
    the image, with token boundaries in black."""
    import torch
    import torch.nn.functional as F

    model.eval()
    x = images.to(device)
    owners = {}
    with torch.no_grad():
        for k in kept_counts:
            owners[k] = owner_map(model.encode(x, k).source)  # (B, g, g)
    size = _display_size(x.shape[-1])
    shown = F.interpolate(x.float().cpu(), size=(size, size), mode="nearest")
    cmap = plt.get_cmap("tab20")
    B, cols = x.shape[0], 1 + len(kept_counts)
    fig, axes = plt.subplots(B, cols, figsize=(1.9 * cols, 1.9 * B), squeeze=False)
    for b in range(B):
        img = _to_hwc(shown[b])
        axes[b, 0].imshow(img)
        for j, k in enumerate(kept_counts, start=1):
            grid = owners[k].shape[-1]
            labels = np.kron(owners[k][b], np.ones((size // grid, size // grid), dtype=np.int64))
            colors = cmap(labels % cmap.N)[..., :3]
            blend = 0.35 * img + 0.65 * colors
            blend[_boundaries(labels)] = 0.0
            axes[b, j].imshow(blend)
            if b == 0:
                axes[b, j].set_title(f"K = {k}", fontsize=9)
        if b == 0:
            axes[b, 0].set_title("image", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    name = getattr(getattr(model, "config", None), "name", "tokenizer")
    fig.suptitle(title or f"Fig. 4: merge maps of {name} (colour = kept token covering each position)",
                 fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Fig. A1: reconstructions


def figA1_reconstructions(models: Mapping[str, object], images, kept_counts: Mapping[str, Sequence[int]],
                          path: str | Path, device="cpu", finetuned: Mapping[str, object] | None = None) -> Path:
    """One panel per variant (``models``: variant -> MergeVQ): rows = originals, then for each K
    of ``kept_counts[variant]`` the reconstruction with the encoder's S and with S_hat, and with the
    fine-tuned Source Recovery's S_hat where ``finetuned`` (variant -> FinetunedRecovery) has one."""
    from torchvision.utils import make_grid

    from mergevq.report.images import reconstruction_rows

    finetuned = finetuned or {}
    per_k = {v: 3 if v in finetuned else 2 for v in models}
    rows_max = 1 + max(per_k[v] * len(kept_counts[v]) for v in models)
    fig, axes = plt.subplots(1, len(models), figsize=((0.9 * len(images) + 1.3) * len(models), 0.9 * rows_max + 0.8),
                             squeeze=False, layout="constrained")  # constrained: room for each panel's row labels
    for ax, (variant, model) in zip(axes[0], models.items()):
        ks = list(kept_counts[variant])
        rows = reconstruction_rows(model, images, ks, device, finetuned.get(variant))  # (R*B, 3, H, W)
        grid = make_grid((rows + 1) / 2, nrow=len(images), padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy())
        h = images.shape[-2] + 1
        kinds = ("S", "S_hat", "S_hat ft") if variant in finetuned else ("S", "S_hat")
        labels = ["original"] + [f"K={k} {s}" for k in ks for s in kinds]
        ax.set_yticks([1 + h * (i + 0.5) for i in range(len(labels))], labels, fontsize=8)
        ax.set_xticks([])
        ax.set_title(f"MergeVQ ({variant})", fontsize=10)
    fig.suptitle("Fig. A1: reconstructions at each kept count (S: encoder's source; S_hat: Source Recovery's; "
                 "ft: after finetune-recovery)" if finetuned else
                 "Fig. A1: reconstructions at each kept count (S: encoder's source; S_hat: Source Recovery's)",
                 fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Fig. A2: class-conditional samples


def figA2_samples(sample_dirs: Sequence[str | Path], path: str | Path, per_class: int = 8,
                  max_classes: int = 10) -> Path:
    """One panel per `mergevq sample` folder (a generator on a tokenizer): rows = the first
    `max_classes` classes, columns = the first `per_class` samples of each (sample order, so the
    grid is fixed by the per-index seeds). The title gives the CFG scale and, when the folder's
    metrics.json exists, gFID (smoke-labelled) and class consistency."""
    import json

    import torch
    from torchvision.utils import make_grid

    from mergevq.eval.generation import load_samples

    if not sample_dirs:
        raise ValueError("figA2_samples: no sample folders given")
    fig, axes = plt.subplots(1, len(sample_dirs), figsize=(0.45 * per_class * len(sample_dirs) + 1.0, 0.5 * max_classes + 1.2),
                             squeeze=False, layout="constrained")
    for ax, folder in zip(axes[0], map(Path, sample_dirs)):
        images, codes, meta = load_samples(folder)
        labels = codes["labels"]
        classes = labels.unique()[:max_classes].tolist()
        picked = []
        for c in classes:
            idx = (labels == c).nonzero().flatten()[:per_class]
            if len(idx) < per_class:
                raise ValueError(f"{folder}: class {c} has {len(idx)} samples, the figure shows {per_class}")
            picked.append(images[idx])
        grid = make_grid(torch.cat(picked).float() / 255, nrow=per_class, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        h = images.shape[-2] + 1
        ax.set_yticks([1 + h * (i + 0.5) for i in range(len(classes))], [str(c) for c in classes], fontsize=8)
        ax.set_xticks([])
        ax.set_ylabel("class")
        title = f"{meta.get('generator_name')}, CFG {meta['settings']['cfg_scale']:g}"
        metrics_path = folder / "metrics.json"
        if metrics_path.is_file():
            m = json.loads(metrics_path.read_text())
            title += f"\ngFID {m['gfid']:.3g}" + (" (smoke)" if m.get("smoke") else "")
            if m.get("class_consistency"):
                title += f", class consistency {100 * m['class_consistency']['top1']:.0f}%"
        ax.set_title(title, fontsize=9)
    fig.suptitle("Fig. A2: class-conditional samples (rows: classes; temperature "
                 f"{meta['settings']['temperature']:g})", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Command line: mergevq figure NAME --config C [--inputs ...] [--tokenizers ...] --out PATH


def find_tokenizers(items: Sequence[str | Path]) -> list[Path]:
    """model.pt files from paths that are files, run dirs (model.pt inside) or tokenizer roots
    ({variant}/model.pt below)."""
    found: list[Path] = []
    for item in map(Path, items):
        if item.is_file():
            found.append(item)
        elif (item / "model.pt").is_file():
            found.append(item / "model.pt")
        elif item.is_dir() and sorted(item.glob("*/model.pt")):
            found.extend(sorted(item.glob("*/model.pt")))
        else:
            raise FileNotFoundError(f"no tokenizer model.pt at {item} (give model.pt files or their directories)")
    if not found:
        raise FileNotFoundError("no tokenizers given (--tokenizers)")
    return found


def validation_images(cfg: dict, num: int):
    """``num`` validation images spread evenly over the split (deterministic): (num, 3, R, R) in [-1, 1]."""
    import torch

    from mergevq.data import build_dataset

    dataset = build_dataset(cfg, "val", transform="eval")
    index = torch.linspace(0, len(dataset) - 1, num).round().long().tolist()
    return torch.stack([dataset[i][0] for i in index])


def _load_models(cfg: dict, items) -> dict:
    from mergevq.tokenizer import load_tokenizer

    models = {}
    for path in find_tokenizers(items):
        model, art = load_tokenizer(path)
        variant = art["variant"]
        if variant in models:
            raise ValueError(f"two tokenizers for variant {variant!r} (second: {path})")
        models[variant] = model
    order = variants(cfg)
    return {v: models[v] for v in sorted(models, key=lambda v: order.index(v) if v in order else len(order))}


def _load_recoveries(paths, models: Mapping[str, object]) -> dict:
    """variant -> FinetunedRecovery of each `finetune-recovery` artefact, beside its variant's tokenizer."""
    from mergevq.files import load_checkpoint
    from mergevq.tokenizer.recovery import load_recovery

    out = {}
    for path in paths:
        variant = load_checkpoint(path, weights_only=False).get("variant")
        if variant not in models:
            raise ValueError(f"{path}: a fine-tuned recovery of variant {variant!r}, whose tokenizer is not given "
                             f"(--tokenizers: {sorted(models)})")
        if variant in out:
            raise ValueError(f"two fine-tuned recoveries for variant {variant!r} (second: {path})")
        model = models[variant]
        out[variant] = load_recovery(path, model).to(next(model.parameters()).device)
    return out


def _sweep_without_full(cfg: dict, variant: str) -> list[int]:
    """The variant's sweep in ascending K, without K = L (no merge: every position its own token)."""
    var = cfg["tokenizer"]["variants"][variant]
    return sorted(k for k in var["sweep"] if k < var["tokens"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=FIGURES, help="which figure")
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--inputs", nargs="*", default=[], metavar="JSON",
                        help="metrics.json files (fig3_tradeoff: sweep and probe), sorted by content")
    parser.add_argument("--tokenizers", nargs="*", default=[], metavar="PATH",
                        help="model.pt files or directories (fig4_merge_maps: one; figA1_reconstructions: one per variant)")
    parser.add_argument("--kept", nargs="*", type=int, default=None,
                        help="kept counts to show (default: the variant's sweep; fig4 leaves out K = L)")
    parser.add_argument("--num-images", type=int, default=4, help="validation images (fig4, figA1)")
    parser.add_argument("--recoveries", nargs="*", default=[], metavar="PATH",
                        help="figA1_reconstructions: `finetune-recovery` model.pt files (at most one per variant)")
    parser.add_argument("--samples", nargs="*", default=[], metavar="DIR",
                        help="figA2_samples: `mergevq sample` folders, one panel each")
    parser.add_argument("--per-class", type=int, default=8, help="figA2_samples: samples shown per class")
    parser.add_argument("--steps", type=int, default=5000, help="sampler draws for the fig5 histogram")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from mergevq.config import load_config

    cfg = load_config(args.config, args.set)
    if args.name == "fig3_tradeoff":
        groups = sort_inputs(args.inputs)
        fig3_tradeoff(groups["sweep"], groups["probe"], cfg, args.out)
    elif args.name == "figA2_samples":
        figA2_samples(args.samples, args.out, per_class=args.per_class)
    elif args.name == "fig5_merge_sampling":
        fig5_merge_sampling(cfg, args.out, steps=args.steps)
    else:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        models = {v: m.to(device) for v, m in _load_models(cfg, args.tokenizers).items()}
        images = validation_images(cfg, args.num_images)
        if args.name == "fig4_merge_maps":
            if len(models) != 1:
                raise ValueError(f"fig4_merge_maps draws one tokenizer; got {len(models)} ({list(models)})")
            (variant, model), = models.items()
            fig4_merge_maps(model, images, args.kept or _sweep_without_full(cfg, variant), args.out, device,
                            title=f"Fig. 4: merge maps of MergeVQ ({variant}) "
                                  "(colour = kept token covering each position)")
        else:
            kept = {v: args.kept or sorted(cfg["tokenizer"]["variants"][v]["sweep"], reverse=True) for v in models}
            figA1_reconstructions(models, images, kept, args.out, device, _load_recoveries(args.recoveries, models))
    print(f"wrote {args.out}")
    return 0
