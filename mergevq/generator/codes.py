"""Extracted codes: what a generator trains on, and how generated codes become images again.

A tokenizer at kept count K turns an image into K code indices Z_Kq (in the canonical order the
encoder emits: sorted by the first position each merged token covers) and a source matrix
S (K x L) that says which of the L grid positions each token covers (Sec. 3.1, Eq. 3, 14). S is a
partition of the positions, so the *owner* vector, owner[l] = the token covering position l
(= S.argmax(0)), holds all of it; and because tokens are sorted by their first position, the
first occurrences of 0..K-1 in owner appear in that order, so the owner vector alone also fixes
the order (checked by `check_owner`).

Generators read these codes in two layouts:
  merged    indices (B, K): the K tokens in canonical order (RandAR on merged tokens, Sec. 4.2);
  positions indices.gather(1, owner) (B, L): the code of each grid position's owner in raster
            order (LlamaGen at K = L, where owner is the identity; MergeAR's x_1..x_L, Sec. 4.1).
Decoding: positions -> the decoder directly (Z_L = the codes, Eq. 14 with one token per
position); merged -> Eq. (14) with S from the owner vector, or with Source Recovery's S_hat when
no S exists (generated merged codes, Eq. 9-10).

Files (`mergevq extract-codes`, one directory per (tokenizer variant, K)):
  {split}-{i:05d}.pt  shards: indices int32 (N, A, K), owner int16 (N, A, L), labels int64 (N,),
                      A = 1, or 2 with the mirrored image (`generator.codes.flip`)
  {split}.json        manifest, written last: the shards, K, L, bits, the tokenizer's sha256
`CodeDataset` reads a manifest; shards are memory-mapped, so a paper-scale set is not loaded whole.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from mergevq.tokenizer.lfq import indices_to_codes

SHARD_FORMAT = "mergevq-codes/1"


# ---------------------------------------------------------------------------------------------
# Owner vector <-> source matrix


def check_owner(owner: torch.Tensor, kept: int) -> None:
    """Raise ValueError unless owner (B, L) is a canonical partition into `kept` tokens: values in
    [0, K), every token owning at least one position, first occurrences in the order 0..K-1."""
    if owner.dim() != 2:
        raise ValueError(f"owner must be (B, L), got shape {tuple(owner.shape)}")
    B, L = owner.shape
    if owner.numel() and (int(owner.min()) < 0 or int(owner.max()) >= kept):
        raise ValueError(f"owner values must lie in [0, {kept}), got [{int(owner.min())}, {int(owner.max())}]")
    first = torch.full((B, kept), L, dtype=torch.long, device=owner.device)
    positions = torch.arange(L, device=owner.device).expand(B, L)
    first.scatter_reduce_(1, owner.long(), positions, reduce="amin")  # (B, K) first position of each token
    if bool((first == L).any()):
        b, k = (first == L).nonzero()[0].tolist()
        raise ValueError(f"sample {b}: token {k} of {kept} owns no position (S is not a partition into K tokens)")
    if bool((first[:, 1:] <= first[:, :-1]).any()):
        b = int((first[:, 1:] <= first[:, :-1]).any(1).nonzero()[0])
        raise ValueError(f"sample {b}: tokens are not in canonical order (first positions {first[b].tolist()}); "
                         "the encoder sorts merged tokens by the first position they cover")


def owner_from_source(source: torch.Tensor, check: bool = True) -> torch.Tensor:
    """source S (B, K, L) binary partition -> owner (B, L) int64 (= S.argmax over K)."""
    owner = source.argmax(dim=1)
    if check:
        if not bool((source.sum(dim=1) == 1).all()):
            raise ValueError("source is not a partition: some position is covered by != 1 token")
        check_owner(owner, source.shape[1])
    return owner


def source_from_owner(owner: torch.Tensor, kept: int) -> torch.Tensor:
    """owner (B, L) integer in [0, K) -> S (B, K, L) float32 one-hot per position (Eq. 14's S)."""
    B, L = owner.shape
    source = torch.zeros(B, kept, L, dtype=torch.float32, device=owner.device)
    return source.scatter_(1, owner.long()[:, None, :], 1.0)


def position_indices(indices: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """indices (B, K) merged codes, owner (B, L) -> (B, L): the code at each grid position."""
    return indices.gather(1, owner.long())


# ---------------------------------------------------------------------------------------------
# Codes -> images


@torch.no_grad()
def decode_positions(tokenizer, indices: torch.Tensor) -> torch.Tensor:
    """Per-position codes (B, L) -> images (B, 3, H, W) in [-1, 1] (clamped).

    Eq. (14) with one token per position (S the identity) is Z_L = the codes themselves."""
    L = tokenizer.num_tokens
    if indices.dim() != 2 or indices.shape[1] != L:
        raise ValueError(f"decode_positions: expected (B, {L}) codes for this tokenizer, got {tuple(indices.shape)}")
    codes = indices_to_codes(indices, tokenizer.config.bits)  # (B, L, D)
    return tokenizer.decoder(codes).float().clamp(-1, 1)


@torch.no_grad()
def decode_merged(tokenizer, indices: torch.Tensor, owner: torch.Tensor | None = None) -> torch.Tensor:
    """Merged codes (B, K) -> images (B, 3, H, W) in [-1, 1] (clamped).

    owner (B, L): decode with the S it defines (extracted codes); None: with Source Recovery's
    S_hat predicted from the codes (generated codes have no S; Eq. 9-10)."""
    codes = indices_to_codes(indices, tokenizer.config.bits)  # (B, K, D)
    if owner is None:
        source = tokenizer.recovery.predict(codes)
    else:
        source = source_from_owner(owner, indices.shape[1])
    return tokenizer.decode(codes, source).float().clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# Shard files


class CodeShard(NamedTuple):
    indices: torch.Tensor  # (N, A, K) int32
    owner: torch.Tensor  # (N, A, L) int16
    labels: torch.Tensor  # (N,) int64


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.pt"


def manifest_path(out_dir: str | os.PathLike, split: str) -> Path:
    return Path(out_dir) / f"{split}.json"


def pack_shard(shard: CodeShard, meta: dict) -> dict:
    """The dict a shard file holds (compact dtypes; meta identifies what made it)."""
    if shard.indices.shape[:2] != shard.owner.shape[:2] or shard.indices.shape[0] != shard.labels.shape[0]:
        raise ValueError(f"shard arrays disagree: indices {tuple(shard.indices.shape)}, owner "
                         f"{tuple(shard.owner.shape)}, labels {tuple(shard.labels.shape)}")
    if shard.owner.numel() and int(shard.owner.max()) > torch.iinfo(torch.int16).max:
        raise ValueError("owner values exceed int16")
    return {"format": SHARD_FORMAT, "meta": meta, "indices": shard.indices.to(torch.int32),
            "owner": shard.owner.to(torch.int16), "labels": shard.labels.to(torch.int64)}


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no code manifest at {path} (made by `mergevq extract-codes`)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path} is not a code manifest (format {SHARD_FORMAT!r})")
    return manifest


class CodeDataset(Dataset):
    """The codes of one manifest: item i -> (indices (A, K) int64, owner (A, L) int64, label int64).

    Shards are memory-mapped (torch.load(mmap=True)). `manifest` holds K (`kept`), L (`tokens`),
    `bits`, `num_classes`, the tokenizer's sha256 and the number of augmentations A.
    """

    def __init__(self, path: str | os.PathLike):
        from mergevq.files import load_checkpoint

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.shards = []
        for entry in self.manifest["shards"]:
            file = self.path.parent / entry["file"]
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.path} lists shard {file}, which does not exist") from None
            except Exception:
                state = load_checkpoint(file)  # raises CheckpointError naming the corrupt file
            if len(state["labels"]) != entry["count"]:
                raise ValueError(f"{file}: {len(state['labels'])} items, the manifest {self.path} says {entry['count']}")
            self.shards.append(state)
        self.offsets = [0]
        for s in self.shards:
            self.offsets.append(self.offsets[-1] + len(s["labels"]))
        if self.offsets[-1] != self.manifest["num_images"]:
            raise ValueError(f"{self.path}: shards hold {self.offsets[-1]} items, num_images is {self.manifest['num_images']}")

    @property
    def kept(self) -> int:
        return int(self.manifest["kept"])

    @property
    def tokens(self) -> int:
        return int(self.manifest["tokens"])

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = next(j for j in range(len(self.shards)) if i < self.offsets[j + 1])
        shard, k = self.shards[s], i - self.offsets[s]
        return shard["indices"][k].long(), shard["owner"][k].long(), shard["labels"][k].long()

    def tensors(self) -> CodeShard:
        """Everything at once: indices (N, A, K), owner (N, A, L), labels (N,), int64."""
        cat = lambda key: torch.cat([s[key] for s in self.shards]).long()  # noqa: E731
        return CodeShard(cat("indices"), cat("owner"), cat("labels"))


class MultiKCodeDataset(Dataset):
    """The codes of one split at several K (one `extract-codes` manifest per K, same tokenizer and
    images): item i -> (indices (J, A, Kmax) int64, zero-padded past each K, owner (J, A, L) int64,
    label) over the J manifests in ascending K. MergeAR trains with K drawn per image from the
    stage-2 merge-ratio sampler; the generator stage picks one of the J rows per sample and step
    (owner alone gives that row's K: owner.max() + 1, every merged token owning a position).
    """

    def __init__(self, paths):
        parts = sorted((CodeDataset(p) for p in paths), key=lambda d: d.kept)
        if not parts:
            raise ValueError("MultiKCodeDataset: no code manifests given")
        ks = [d.kept for d in parts]
        if len(set(ks)) != len(ks):
            raise ValueError(f"code manifests {[str(d.path) for d in parts]} repeat a K: {ks}")
        first = parts[0]
        first_labels = first.tensors().labels  # loaded once, compared with every other manifest's
        for d in parts[1:]:
            for key in ("tokens", "num_images", "augmentations", "split", "bits", "grid"):
                if d.manifest.get(key) != first.manifest.get(key):
                    raise ValueError(f"{d.path} and {first.path} disagree on {key}: "
                                     f"{d.manifest.get(key)!r} vs {first.manifest.get(key)!r}")
            if d.manifest["tokenizer"]["sha256"] != first.manifest["tokenizer"]["sha256"]:
                raise ValueError(f"{d.path} and {first.path} come from different tokenizers")
            if not torch.equal(d.tensors().labels, first_labels):
                raise ValueError(f"{d.path} and {first.path} hold different images (labels differ)")
        self.parts, self.path = parts, first.path
        self.kept_values = ks
        self.manifest = {**first.manifest, "kept": ks, "manifests": [str(d.path) for d in parts]}

    @property
    def kept(self) -> list[int]:
        return list(self.kept_values)

    @property
    def tokens(self) -> int:
        return self.parts[0].tokens

    def __len__(self) -> int:
        return len(self.parts[0])

    def __getitem__(self, i: int):
        kmax = self.kept_values[-1]
        items = [d[i] for d in self.parts]
        indices = torch.stack([torch.nn.functional.pad(x[0], (0, kmax - x[0].shape[-1])) for x in items])
        return indices, torch.stack([x[1] for x in items]), items[0][2]


def open_codes(paths) -> "CodeDataset | MultiKCodeDataset":
    """One manifest -> CodeDataset; several (one per K) -> MultiKCodeDataset."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return CodeDataset(paths[0]) if len(paths) == 1 else MultiKCodeDataset(paths)
