"""FID and IS through torch-fidelity, with the protocol recorded beside every number.

Published FIDs disagree mostly because protocols differ (feature extractor, its weights, reference
set, image count, resizing, JPEG), so every result carries a ``protocol`` dict naming all of them,
and a run on fewer than 2,048 images is flagged ``smoke`` (below that the 2048-d Inception
covariance is singular and FID is biased far upwards).

All feature extraction, statistics and metrics are torch-fidelity's own functions
(``create_feature_extractor``, ``get_featuresdict_from_dataset``, ``fid_featuresdict_to_statistics``,
``fid_statistics_to_metric``, ``isc_featuresdict_to_metric``); nothing here reimplements Inception
or the Fréchet distance. Going one level below ``calculate_metrics`` is what lets one extraction of
the generated set serve both FID and IS, and lets FID be taken against stored statistics
(mu, sigma) -- which is how gFID against ADM's ``VIRTUAL_imagenet256_labeled.npz`` works:
pass that file as the second input with ``extractor="inception-v3-compat"``, whose "2048" feature
is the TF-Inception pool3 feature ADM's evaluator used. Results equal ``calculate_metrics``'s on
the same inputs (tested).

Inputs: a uint8 tensor (N, 3, H, W), a Dataset yielding uint8 (3, H, W) tensors, or a folder of
PNG images (searched recursively; JPEG and other image formats are refused: lossy compression
shifts FID). The second input may also be a statistics file (.npz with ``mu``, ``sigma``).
Weights are never downloaded: every extractor gets its local weights file through torch-fidelity's
``feature_extractor_weights_path``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

SMOKE_THRESHOLD = 2048  # fewer images than Inception's feature dims: FID is a smoke test
ISC_SPLITS = 10  # torch-fidelity's and the original Inception Score's default
ISC_SEED = 2020  # torch-fidelity's default shuffle seed for the IS splits
DEMO_EXTRACTOR = "demo-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Folder inputs at least this large are decoded by DataLoader workers (torch-fidelity starts
# min(4, 2 x cores) of them unless save_cpu_ram); smaller ones are not worth the start-up.
FOLDER_WORKERS_FROM = 512


class FidelityError(ValueError):
    """An input or setting that would give a wrong or incomparable number; the message says which."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Image inputs
# ---------------------------------------------------------------------------------------------
def check_uint8_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Validate images (N, 3, H, W) in [0, 255]; integer tensors are cast to uint8, floats refused.

    Floats are refused rather than guessed: [-1, 1], [0, 1] and [0, 255] floats all occur, and a
    wrong guess silently changes FID. Convert [-1, 1] images with ``mergevq.data.datasets.to_uint8``.
    """
    if not torch.is_tensor(images):
        raise FidelityError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise FidelityError(f"{name}: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    if len(images) == 0:
        raise FidelityError(f"{name}: no images")
    if images.dtype == torch.uint8:
        return images
    if images.is_floating_point() or images.dtype == torch.bool or images.is_complex():
        lo, hi = (float(images.min()), float(images.max())) if images.dtype != torch.bool else (0, 1)
        raise FidelityError(
            f"{name}: expected uint8 images in [0, 255], got {images.dtype} with values in [{lo:g}, {hi:g}]; "
            "convert [-1, 1] images with mergevq.data.datasets.to_uint8"
        )
    lo, hi = int(images.min()), int(images.max())
    if lo < 0 or hi > 255:
        raise FidelityError(f"{name}: values outside [0, 255] (min {lo}, max {hi}) in a {images.dtype} tensor")
    return images.to(torch.uint8)


class UInt8ImageDataset(Dataset):
    """uint8 images (N, 3, H, W) as torch-fidelity reads them: one uint8 (3, H, W) tensor per item."""

    image_format = "uint8-tensor"

    def __init__(self, images: torch.Tensor, name: str = "images"):
        self.images = check_uint8_images(images, name).cpu()
        self.resolution = tuple(self.images.shape[-2:])
        self.source = f"tensor {tuple(self.images.shape)}"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class PngFolderDataset(Dataset):
    """The PNG images under ``root`` (recursive, sorted paths), decoded to uint8 (3, H, W) RGB.

    Refuses JPEG and every other image format (lossy compression shifts FID), an empty folder,
    and images of more than one size (each is checked from its header, without decoding).
    """

    image_format = "png"

    def __init__(self, root: str | os.PathLike):
        from PIL import Image

        self.root = Path(root)
        if not self.root.is_dir():
            raise FidelityError(f"image folder not found: {self.root}")
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        refused = [p for p in files if p.suffix.lower() != ".png"]
        if refused:
            kinds = sorted({p.suffix.lower() for p in refused})
            raise FidelityError(
                f"{self.root}: {len(refused)} non-PNG image file(s) ({', '.join(kinds)}; e.g. {refused[0]}): "
                "FID is computed on PNG only, because JPEG compression shifts FID; save the images as PNG"
            )
        if not files:
            raise FidelityError(f"{self.root}: no PNG images found (searched recursively)")
        sizes: dict[tuple[int, int], Path] = {}
        for p in files:
            with Image.open(p) as img:
                sizes.setdefault((img.height, img.width), p)
        if len(sizes) > 1:
            listed = "; ".join(f"{h}x{w} (e.g. {p})" for (h, w), p in sorted(sizes.items()))
            raise FidelityError(f"{self.root}: images of different sizes: {listed}")
        self.files = files
        self.resolution = next(iter(sizes))
        self.source = str(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            array = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8; grey and RGBA become RGB
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class _GenericDataset(Dataset):
    """Any Dataset of uint8 (3, H, W) tensors; the first item is checked, sizes are taken from it."""

    image_format = "dataset"

    def __init__(self, dataset: Dataset, name: str):
        if len(dataset) == 0:
            raise FidelityError(f"{name}: empty dataset")
        first = dataset[0]
        if not torch.is_tensor(first) or first.dim() != 3:
            raise FidelityError(f"{name}: the dataset must yield (3, H, W) tensors, got {type(first).__name__}")
        check_uint8_images(first[None], name)
        if first.dtype != torch.uint8:
            raise FidelityError(f"{name}: the dataset must yield uint8 tensors, got {first.dtype}")
        self.dataset = dataset
        self.resolution = tuple(first.shape[-2:])
        self.source = f"dataset {type(dataset).__name__}"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset[i]


def as_image_dataset(images: Any, name: str = "input") -> Dataset:
    """A tensor, Dataset or PNG folder -> a Dataset with ``resolution``, ``image_format``, ``source``."""
    if isinstance(images, (UInt8ImageDataset, PngFolderDataset, _GenericDataset)):
        return images
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            return PngFolderDataset(path)
        if path.suffix == ".npz":
            raise FidelityError(f"{name}: {path} is a statistics file; only the second (reference) input may be one")
        raise FidelityError(f"{name}: {path} is not a folder of PNG images")
    if torch.is_tensor(images):
        return UInt8ImageDataset(images, name)
    if isinstance(images, Dataset):
        return _GenericDataset(images, name)
    raise FidelityError(f"{name}: expected a uint8 tensor, a Dataset or a folder of PNGs, got {type(images).__name__}")


# ---------------------------------------------------------------------------------------------
# Feature extractors (torch-fidelity's registry)
# ---------------------------------------------------------------------------------------------
def _registry() -> dict:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    import mergevq.eval.demo_classifier  # noqa: F401  (registers "demo-classifier")

    return FEATURE_EXTRACTORS_REGISTRY


def require_weights(extractor: str, weights_path: str | os.PathLike | None) -> Path:
    """The extractor's local weights file; errors name the path and how to obtain it."""
    registry = _registry()
    if extractor not in registry:
        raise FidelityError(f"unknown feature extractor {extractor!r} (registered: {', '.join(sorted(registry))})")
    if weights_path is None:
        raise FidelityError(
            f"feature extractor {extractor!r} needs a local weights file (weights_path / --weights); "
            "nothing is downloaded"
        )
    path = Path(weights_path)
    if not path.is_file():
        how = (
            "train it with `mergevq train-demo-classifier`"
            if extractor == DEMO_EXTRACTOR
            else "`mergevq fetch-weights` downloads it"
        )
        raise FidelityError(f"weights file for feature extractor {extractor!r} not found: {path}; {how}")
    return path


def feature_layers(extractor: str, weights_path: str | os.PathLike, isc: bool = True) -> tuple[str, str | None]:
    """(FID feature name, IS feature name or None) for an extractor, by torch-fidelity's defaults.

    The demo classifier's FID feature is named by its feature_dim, which only its weights file knows.
    """
    cls = _registry()[extractor]
    fid_layer = cls.get_default_feature_layer_for_metric("fid")
    if extractor == DEMO_EXTRACTOR:
        from mergevq.eval.demo_classifier import read_demo_config

        fid_layer = str(read_demo_config(weights_path).feature_dim)
    isc_layer = None
    if isc:
        try:
            isc_layer = cls.get_default_feature_layer_for_metric("isc")
        except KeyError:
            raise FidelityError(
                f"feature extractor {extractor!r} has no Inception Score feature; pass isc=False"
            ) from None
    return fid_layer, isc_layer


def _create_extractor(extractor: str, weights_path: Path, layers: list[str], verbose: bool):
    from torch_fidelity.utils import create_feature_extractor

    return create_feature_extractor(
        extractor,
        layers,
        cuda=torch.cuda.is_available(),
        feature_extractor_weights_path=str(weights_path),
        verbose=verbose,
    )


def _extract(dataset: Dataset, feat_extractor, batch_size: int, verbose: bool) -> dict[str, torch.Tensor]:
    from torch_fidelity.utils import get_featuresdict_from_dataset

    workers = isinstance(dataset, PngFolderDataset) and len(dataset) >= FOLDER_WORKERS_FROM
    return get_featuresdict_from_dataset(
        dataset, feat_extractor, batch_size, torch.cuda.is_available(), not workers, verbose
    )


def extract_features(
    images: Any,
    *,
    extractor: str,
    weights_path: str | os.PathLike,
    layers: list[str] | None = None,
    batch_size: int = 64,
    verbose: bool = False,
) -> dict[str, torch.Tensor]:
    """Features {name: (N, D) float32} of images; layers default to the extractor's FID and IS ones."""
    weights_path = require_weights(extractor, weights_path)
    dataset = as_image_dataset(images)
    if layers is None:
        layers = [x for x in feature_layers(extractor, weights_path) if x is not None]
    return _extract(dataset, _create_extractor(extractor, weights_path, layers, verbose), batch_size, verbose)


def create_extractor(extractor: str, weights_path: str | os.PathLike, layers: list[str]):
    """torch-fidelity's feature extractor (on the GPU when available) for FeatureAccumulator."""
    return _create_extractor(extractor, require_weights(extractor, weights_path), layers, False)


class FeatureAccumulator:
    """Features of images that arrive batch by batch (streaming evaluation), equal to
    ``extract_features`` of their concatenation: the same torch-fidelity extractor, called per
    batch as ``get_featuresdict_from_dataset`` calls it. Holds only the features (N, D) float32.

    feat_extractor: from ``create_extractor``; several accumulators may share one.
    """

    def __init__(self, feat_extractor):
        self.feat_extractor = feat_extractor
        self.cuda = torch.cuda.is_available()
        self._parts: dict[str, list[torch.Tensor]] = {}

    @torch.no_grad()
    def add(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images uint8 (B, 3, H, W) on any device -> this batch's {name: (B, D)} on the CPU (also kept)."""
        images = check_uint8_images(images)
        if self.cuda:
            images = images.cuda(non_blocking=True)
        feats = self.feat_extractor.convert_features_tuple_to_dict(self.feat_extractor(images))
        out = {k: v.cpu() for k, v in feats.items()}
        for k, v in out.items():
            self._parts.setdefault(k, []).append(v)
        return out

    def features(self) -> dict[str, torch.Tensor]:
        """{name: (N, D)} of every image added so far, in order."""
        if not self._parts:
            raise FidelityError("FeatureAccumulator: no images were added")
        return {k: torch.cat(v) for k, v in self._parts.items()}


# ---------------------------------------------------------------------------------------------
# FID statistics (mu, sigma), stored as .npz
# ---------------------------------------------------------------------------------------------
class FidStatistics(NamedTuple):
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    num_images: int | None  # None when a stored file does not say (ADM's reference batch)
    resolution: tuple[int, int] | None

    def sha256(self) -> str:
        """Hash of mu and sigma (float64 bytes): names the reference whatever file it came from."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.mu, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(self.sigma, dtype=np.float64).tobytes())
        return h.hexdigest()

    def as_torch_fidelity(self) -> dict:
        # fid_statistics_to_metric asserts equal dtypes; torch-fidelity's own mu is float32 (the
        # features' dtype) and its sigma float64 (np.cov), ADM's are both float64: use float64 throughout.
        return {"mu": self.mu.astype(np.float64), "sigma": self.sigma.astype(np.float64)}


def statistics_from_features(features: torch.Tensor, resolution: tuple[int, int] | None = None) -> FidStatistics:
    """features (N, D) -> FidStatistics via torch-fidelity's fid_featuresdict_to_statistics."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics

    if features.dim() != 2 or len(features) < 2:
        raise FidelityError(f"FID statistics need (N >= 2, D) features, got {tuple(features.shape)}")
    # float64 features: torch-fidelity would otherwise take the mean in float32 (its covariance is float64 anyway)
    stats = fid_featuresdict_to_statistics({"features": features.detach().cpu().double()}, "features")
    return FidStatistics(
        mu=stats["mu"].astype(np.float64),
        sigma=np.atleast_2d(stats["sigma"]).astype(np.float64),
        num_images=len(features),
        resolution=tuple(resolution) if resolution is not None else None,
    )


def frechet_distance(stats1: FidStatistics, stats2: FidStatistics) -> float:
    """FID between two sets of statistics, by torch-fidelity's fid_statistics_to_metric."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if stats1.mu.shape != stats2.mu.shape:
        raise FidelityError(
            f"statistics of different feature sizes: {stats1.mu.shape[0]} vs {stats2.mu.shape[0]} "
            "(another extractor or feature layer made one of them)"
        )
    return fid_statistics_to_metric(stats1.as_torch_fidelity(), stats2.as_torch_fidelity(), False)[KEY_METRIC_FID]


def compute_statistics(
    images: Any, *, extractor: str, weights_path: str | os.PathLike, batch_size: int = 64, verbose: bool = False
) -> FidStatistics:
    """FID statistics of images (tensor, Dataset or PNG folder) under an extractor's FID feature."""
    weights_path = require_weights(extractor, weights_path)
    dataset = as_image_dataset(images)
    fid_layer, _ = feature_layers(extractor, weights_path, isc=False)
    feats = _extract(dataset, _create_extractor(extractor, weights_path, [fid_layer], verbose), batch_size, verbose)
    return statistics_from_features(feats[fid_layer], dataset.resolution)


def save_statistics(path: str | os.PathLike, stats: FidStatistics, meta: dict | None = None) -> None:
    """Write mu, sigma and a JSON ``meta`` string (provenance) atomically to an .npz file."""
    from mergevq.files import atomic_path

    meta = dict(meta or {}, num_images=stats.num_images, resolution=stats.resolution)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
        np.savez(f, mu=stats.mu, sigma=stats.sigma, meta=np.array(json.dumps(meta, sort_keys=True)))


def load_statistics(path: str | os.PathLike) -> tuple[FidStatistics, dict]:
    """(FidStatistics, meta) from an .npz holding ``mu`` and ``sigma`` (ours, or ADM's reference batch)."""
    path = Path(path)
    if not path.is_file():
        raise FidelityError(f"statistics file not found: {path}")
    with np.load(path, allow_pickle=False) as data:  # lazy: ADM's file also holds 10k images we never read
        if "mu" not in data.files or "sigma" not in data.files:
            raise FidelityError(f"{path}: not a statistics file (needs arrays 'mu' and 'sigma', has {data.files})")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FidelityError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    resolution = tuple(meta["resolution"]) if meta.get("resolution") else None
    return FidStatistics(mu, sigma, meta.get("num_images"), resolution), meta


def _is_statistics_file(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike)) and Path(x).suffix == ".npz"


# ---------------------------------------------------------------------------------------------
# FID + IS with protocol
# ---------------------------------------------------------------------------------------------
def fid_is(
    input1: Any,
    input2: Any,
    *,
    extractor: str,
    weights_path: str | os.PathLike,
    batch_size: int = 64,
    isc: bool = True,
    cache_name: str | None = None,
    cache_root: str | os.PathLike | None = None,
    verbose: bool = False,
) -> dict:
    """FID(input1, input2) and IS(input1), with the protocol that produced them.

    input1: uint8 tensor (N, 3, H, W) | Dataset of uint8 (3, H, W) | folder of PNGs (generated or
        reconstructed images). input2: the same kinds (reference images), or an .npz of statistics.
    cache_name: if given, input2's statistics are stored once as
        ``{cache_root}/{cache_name}-{extractor}-{layer}-{weights sha256[:16]}.npz`` and reused; a
        cached file whose image count or resolution no longer matches input2 is an error (delete it).
        cache_root defaults to torch-fidelity's cache folder ($TORCH_HOME/fidelity_cache).
    Returns {"fid", "is", "is_std" (None without isc), "protocol": {...}}. Uses the GPU only if
    torch.cuda.is_available().
    """
    from torch_fidelity import __version__ as tf_version
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_featuresdict_to_metric

    weights_path = require_weights(extractor, weights_path)
    weights_sha = sha256_file(weights_path)
    fid_layer, isc_layer = feature_layers(extractor, weights_path, isc)
    set1 = as_image_dataset(input1, "input1")

    # The reference, and every check that can fail, before any image goes through the network.
    ref_dataset, ref_stats, ref_meta, cache_path = None, None, {}, None
    if _is_statistics_file(input2):
        ref_stats, ref_meta = load_statistics(input2)
        for key, ours in (("extractor", extractor), ("feature_layer", fid_layer), ("weights_sha256", weights_sha)):
            if key in ref_meta and ref_meta[key] != ours:
                raise FidelityError(f"{input2}: statistics made with {key} {ref_meta[key]!r}, not {ours!r}")
        ref_source, ref_format = str(input2), "statistics-npz"
    else:
        ref_dataset = as_image_dataset(input2, "input2")
        ref_source, ref_format = ref_dataset.source, ref_dataset.image_format
        if cache_name is not None:
            if cache_root is None:
                cache_root = Path(torch.hub._get_torch_home()) / "fidelity_cache"  # torch-fidelity's default
            cache_path = Path(cache_root) / f"{cache_name}-{extractor}-{fid_layer}-{weights_sha[:16]}.npz"
            if cache_path.is_file():
                ref_stats, ref_meta = load_statistics(cache_path)
                if (ref_stats.num_images, ref_stats.resolution) != (len(ref_dataset), tuple(ref_dataset.resolution)):
                    raise FidelityError(
                        f"stale statistics cache {cache_path}: made from {ref_stats.num_images} images at "
                        f"{ref_stats.resolution}, input2 has {len(ref_dataset)} at {ref_dataset.resolution}; delete it"
                    )
    ref_resolution = ref_dataset.resolution if ref_dataset is not None else ref_stats.resolution
    if ref_resolution is not None and tuple(ref_resolution) != tuple(set1.resolution):
        raise FidelityError(
            f"image sizes differ: input1 {tuple(set1.resolution)}, input2 {tuple(ref_resolution)}; "
            "FID between sets of different sizes mixes resizing into the score (resize one set first)"
        )

    layers = [fid_layer] + ([isc_layer] if isc_layer and isc_layer != fid_layer else [])
    feat_extractor = _create_extractor(extractor, weights_path, layers, verbose)
    features1 = _extract(set1, feat_extractor, batch_size, verbose)
    stats1 = statistics_from_features(features1[fid_layer], set1.resolution)
    if ref_stats is None:
        ref_stats = statistics_from_features(_extract(ref_dataset, feat_extractor, batch_size, verbose)[fid_layer],
                                             ref_dataset.resolution)
        if cache_path is not None:
            save_statistics(cache_path, ref_stats, _provenance(extractor, fid_layer, weights_path, weights_sha,
                                                               ref_source, ref_format))
    fid = frechet_distance(stats1, ref_stats)

    result: dict[str, Any] = {"fid": fid, "is": None, "is_std": None}
    if isc_layer is not None:
        score = isc_featuresdict_to_metric(
            features1, isc_layer, isc_splits=ISC_SPLITS, samples_shuffle=True, rng_seed=ISC_SEED, verbose=verbose
        )
        result.update({"is": score[KEY_METRIC_ISC_MEAN], "is_std": score[KEY_METRIC_ISC_STD]})

    counts = [n for n in (len(set1), ref_stats.num_images) if n is not None]
    result["protocol"] = {
        "backend": f"torch-fidelity {tf_version}",
        **_provenance(extractor, fid_layer, weights_path, weights_sha, set1.source, set1.image_format),
        "feature_layer_isc": isc_layer,
        "isc_splits": ISC_SPLITS if isc_layer else None,
        "num_images": len(set1),
        "resolution": list(set1.resolution),
        "reference_source": ref_source,
        "reference_format": ref_format,
        "reference_num_images": ref_stats.num_images,
        "reference_resolution": list(ref_resolution) if ref_resolution is not None else None,
        "reference_sha256": ref_stats.sha256(),
        "reference_cache": str(cache_path) if cache_path is not None else None,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "smoke": min(counts) < SMOKE_THRESHOLD,
    }
    return result


def _provenance(extractor, fid_layer, weights_path, weights_sha, source, image_format) -> dict:
    return {
        "extractor": extractor,
        "feature_layer": fid_layer,
        "weights": str(weights_path),
        "weights_sha256": weights_sha,
        "source": source,
        "image_format": image_format,
    }


# ---------------------------------------------------------------------------------------------
# Command line: mergevq fid PATH_A PATH_B
# ---------------------------------------------------------------------------------------------
def _default_inception_weights() -> Path:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from mergevq.config import REPO_ROOT

    # Same file as config.yaml's weights.inception: torch-fidelity's release file, fetched by fetch-weights.
    return REPO_ROOT / "resources" / "weights" / URL_INCEPTION_V3.rsplit("/", 1)[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path_a", metavar="PATH_A",
                        help="folder of PNG images (generated / reconstructed); IS is of this set")
    parser.add_argument("path_b", metavar="PATH_B",
                        help="folder of PNG reference images, or a statistics .npz (mu, sigma)")
    parser.add_argument("--extractor", default=INCEPTION_EXTRACTOR,
                        help=f"torch-fidelity feature extractor (default {INCEPTION_EXTRACTOR}; "
                        f"the demo uses {DEMO_EXTRACTOR})")
    parser.add_argument("--weights", help="the extractor's local weights file "
                        "(default for inception-v3-compat: resources/weights/<torch-fidelity's file>)")
    parser.add_argument("--json", help="also write the result to this JSON file (atomically)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-isc", action="store_true", help="skip the Inception Score")


def run(args) -> int:
    from mergevq.files import write_json

    weights = args.weights
    if weights is None and args.extractor == INCEPTION_EXTRACTOR:
        weights = _default_inception_weights()
    # a FidelityError (refused input) reaches mergevq.cli, which prints it as one line (exit 1)
    result = fid_is(args.path_a, args.path_b, extractor=args.extractor, weights_path=weights,
                    batch_size=args.batch_size, isc=not args.no_isc, verbose=True)
    print(json.dumps(result, indent=2, sort_keys=True))
    if args.json:
        write_json(args.json, result)
    return 0
