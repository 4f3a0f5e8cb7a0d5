"""MergeVQ encoders: E_1 (CNN or patch embedding) then E_2 (attention with token merging).

Sec. 3.1 Eq. (1)-(3), Sec. 3.2 Eq. (7)-(8), App. A.1 Table A1:
  G, G+R  hybrid: MAGVIT-v2 residual CNN (f = 8 / 16) -> cls token + 12 ToMe blocks at the
          deepest CNN width (512);
  R       ViT-B: 16x16 patch embedding -> cls token + 12 ToMe blocks at width 768.
The merged tokens are normalised and projected to the LFQ channels (`bits`, 18 in the paper).

Also here: `init_from_dinov2`, the weight-selection initialisation of the attention blocks from a
DINOv2-Base state_dict (Xu et al. 2023), which the paper applies to G and G+R.

Shapes: B batch, H x W image, g x g token grid (g = H / f), L = g^2 tokens before merging,
K kept tokens, d attention width, D = bits.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mergevq.tokenizer.tome import ToMeBlock, merge_schedule


class EncoderOutput(NamedTuple):
    hidden: torch.Tensor  # (B, K, d) normalised merged tokens, input of the code projection
    z: torch.Tensor  # (B, K, D) pre-quantisation codes
    source: torch.Tensor  # (B, K, L) binary float; row k marks the positions token k covers
    size: torch.Tensor  # (B, K, 1) number of positions each token covers (row sums of source)
    global_feature: torch.Tensor  # (B, d) normalised cls token output (for Eq. 12's alignment)


# ---------------------------------------------------------------------------------------------
# Convolutional building blocks (shared with the decoder)


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    """MAGVIT-v2's GroupNorm (32 groups, eps 1e-6); narrower demo widths use gcd(32, channels)."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6, affine=affine)


class ResBlock(nn.Module):
    """MAGVIT-v2 residual block: (GroupNorm, SiLU, 3x3 conv) x 2, 1x1 shortcut on width change.

    Convolutions carry no bias because a GroupNorm follows each of them (Open-MAGVIT2's choice).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, bias=False)
                         if in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, h, w) -> (B, C_out, h, w)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class CNNEncoder(nn.Module):
    """E_1 of the hybrid variants, Eq. (1): conv_in, then per stage `num_res_blocks` residual
    blocks at width ch * ch_mult[i] and a stride-2 3x3 conv between stages (f = 2^(stages-1))."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.stages = nn.ModuleList()
        width = ch
        for i, mult in enumerate(ch_mult):
            stage = nn.Module()
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(width, ch * mult))
                width = ch * mult
            stage.blocks = nn.Sequential(*blocks)
            stage.downsample = (nn.Conv2d(width, width, 3, stride=2, padding=1)
                                if i < len(ch_mult) - 1 else nn.Identity())
            self.stages.append(stage)
        self.out_channels = width
        self.factor = 2 ** (len(ch_mult) - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> features (B, ch * ch_mult[-1], H / f, W / f)."""
        x = self.conv_in(images)
        for stage in self.stages:
            x = stage.downsample(stage.blocks(x))
        return x


class PatchEmbed(nn.Module):
    """E_1 of the R variant: ViT patch embedding (a p x p conv with stride p)."""

    def __init__(self, patch_size: int, dim: int, in_channels: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.out_channels = dim
        self.factor = patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> (B, dim, H / p, W / p)."""
        return self.proj(images)


def init_transformer_weights(module: nn.Module) -> None:
    """timm ViT initialisation for the attention parts: trunc-normal(0.02) linears, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# Token ordering


def order_by_first_position(source: torch.Tensor) -> torch.Tensor:
    """Permutation putting merged tokens in raster order of the first position each one covers.

    source (B, K, L) binary -> (B, K) int64 indices. ToMe leaves tokens in its A/B bookkeeping
    order, which depends on the matching; sorting makes the order canonical (token 0 covers
    position 0), the order MergeAR's raster-scan causal mask (Eq. 16) reads tokens in.
    """
    first = source.argmax(dim=-1)  # (B, K) argmax returns the first maximal index
    return first.argsort(dim=-1)


def gather_tokens(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """t (B, K, C), order (B, K) -> t[b, order[b]] (B, K, C)."""
    return t.gather(1, order[..., None].expand(-1, -1, t.shape[-1]))


# ---------------------------------------------------------------------------------------------
# The encoder


class MergeVQEncoder(nn.Module):
    """E = E_2 o E_1 (Eq. 3): images -> K merged tokens, their source matrix and codes.

    kind "cnn" (G, G+R): attention width `dim`, by default the deepest CNN width ch * ch_mult[-1]
    as in the paper; a different `dim` (the scaled-down demo presets) adds a linear token embedding
    from the CNN width (timm's HybridEmbed does the same).
    kind "vit" (R): patch embedding of width `dim`.
    Unlike the authors' hybrid encoder (no positional embedding) both kinds add a learned
    positional embedding to the L tokens and the cls token, as ViT/DINOv2 do; it is what lets
    blocks initialised from DINOv2 see positions. The output head is LayerNorm -> SiLU -> linear
    to `bits` channels: the authors use GroupNorm -> SiLU -> 1x1 conv on the sqrt(K) grid, but
    merged tokens are a set, and a GroupNorm over them would pool statistics across tokens and
    make each code depend on how many tokens were kept.
    """

    def __init__(self, *, resolution: int, bits: int, kind: str = "cnn", ch: int = 64,
                 ch_mult: tuple[int, ...] = (1, 2, 4, 8), num_res_blocks: int = 4,
                 patch_size: int = 16, dim: int | None = None, depth: int = 12, num_heads: int = 8,
                 mlp_ratio: float = 4.0, layer_scale_init: float | None = 1e-5,
                 schedule: str = "tome"):
        super().__init__()
        if kind == "cnn":
            self.stem = CNNEncoder(ch, tuple(ch_mult), num_res_blocks)
        elif kind == "vit":
            if dim is None:
                raise ValueError("MergeVQEncoder: kind='vit' needs dim")
            self.stem = PatchEmbed(patch_size, dim)
        else:
            raise ValueError(f"MergeVQEncoder: unknown kind {kind!r}; expected 'cnn' or 'vit'")
        dim = dim or self.stem.out_channels
        self.embed = (nn.Linear(self.stem.out_channels, dim) if dim != self.stem.out_channels
                      else nn.Identity())
        if resolution % self.stem.factor:
            raise ValueError(f"MergeVQEncoder: resolution {resolution} is not divisible by the "
                             f"downsampling factor {self.stem.factor}")
        if depth < 1:
            raise ValueError(f"MergeVQEncoder: depth must be >= 1, got {depth}")
        self.kind = kind
        self.resolution = resolution
        self.dim = dim
        self.grid = resolution // self.stem.factor
        self.num_tokens = self.grid ** 2
        self.schedule = schedule

        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_tokens, self.dim))  # cls first
        self.blocks = nn.ModuleList(
            ToMeBlock(self.dim, num_heads, mlp_ratio, qkv_bias=True, layer_scale_init=layer_scale_init)
            for _ in range(depth))
        self.norm = nn.LayerNorm(self.dim)
        self.proj = nn.Linear(self.dim, bits)

        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        init_transformer_weights(self.embed)
        init_transformer_weights(self.blocks)
        init_transformer_weights(self.proj)

    def merge_schedule(self, kept: int, schedule: str | None = None, num_tokens: int | None = None) -> list[int]:
        """Per-block merge counts r_i with sum L - K (Eq. 7's K = L - sum r); L = num_tokens, by
        default the token count at the built resolution."""
        return merge_schedule(num_tokens or self.num_tokens, kept, len(self.blocks), schedule or self.schedule)

    def position_embedding(self, grid: int) -> torch.Tensor:
        """(1, 1 + grid^2, d): the learned embedding, its g x g part resampled bicubically (timm's
        resample_abs_pos_embed, as ViTs evaluated at another resolution do) when grid != g."""
        if grid == self.grid:
            return self.pos_embed
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(self.pos_embed, [grid, grid], [self.grid, self.grid], num_prefix_tokens=1)

    def forward(self, images: torch.Tensor, kept: int, schedule: str | None = None,
                any_resolution: bool = False) -> EncoderOutput:
        """images (B, 3, H, W) in [-1, 1], kept K in [1, L] -> EncoderOutput (tokens sorted by the
        first position they cover). schedule overrides the configured merge-schedule kind.

        any_resolution: accept square images of another side (a multiple of the downsampling factor,
        e.g. the 224-px alignment views of a 256-px model): L is then (side / f)^2 and the positional
        embedding is resampled to that grid. Off by default, so a wrongly sized input is an error.
        """
        side = images.shape[-1]
        if images.shape[-2] != side or (not any_resolution and side != self.resolution) \
                or side % self.stem.factor:
            raise ValueError(f"MergeVQEncoder built for {self.resolution}px images got "
                             f"{tuple(images.shape)}" + (f" (square, side a multiple of {self.stem.factor})"
                                                         if any_resolution else ""))
        grid = side // self.stem.factor
        rs = self.merge_schedule(kept, schedule, num_tokens=grid * grid)
        feats = self.stem(images)  # (B, d, g, g), Eq. (1)
        B = feats.shape[0]
        x = self.embed(feats.flatten(2).transpose(1, 2))  # (B, L, d), row-major positions
        cls = self.cls_token.expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding(grid)  # (B, 1 + L, d)

        size = source = None
        for block, r in zip(self.blocks, rs):  # Eq. (7)-(8)
            x, size, source = block(x, r, size, source, num_prefix_tokens=1)

        x = self.norm(x)  # (B, 1 + K, d)
        order = order_by_first_position(source)
        hidden = gather_tokens(x[:, 1:], order)  # (B, K, d)
        source = gather_tokens(source, order)  # (B, K, L)
        size = gather_tokens(size, order)  # (B, K, 1)
        z = self.proj(F.silu(hidden))  # (B, K, D)
        return EncoderOutput(hidden, z, source, size, x[:, 0])


# ---------------------------------------------------------------------------------------------
# Weight selection from DINOv2-Base (Xu et al. 2023, "Initializing Models with Larger Ones")


def uniform_element_selection(weight: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Evenly spaced elements of a larger tensor along every dimension.

    weight (n_0, n_1, ...) -> (m_0, m_1, ...) with m_i <= n_i: along dimension i keep indices
    arange(m_i) * (n_i // m_i) when m_i divides n_i, else round(linspace(0, n_i - 1, m_i))
    (the rule of Xu et al.'s and the MergeVQ authors' `uniform_element_selection`).
    """
    if weight.dim() != len(shape):
        raise ValueError(f"weight selection: source {tuple(weight.shape)} and target {tuple(shape)} "
                         f"differ in rank")
    out = weight
    for dim, (n, m) in enumerate(zip(weight.shape, shape)):
        if m > n:
            raise ValueError(f"weight selection: target {tuple(shape)} is larger than source "
                             f"{tuple(weight.shape)} along dimension {dim}")
        if m == n:
            continue
        if n % m == 0:
            index = torch.arange(m) * (n // m)
        else:
            index = torch.linspace(0, n - 1, m).round().long()
        out = out.index_select(dim, index)
    return out


def _select_qkv(weight: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Weight selection for timm's fused qkv (3C, C) / (3C,): select within each of q, k, v so the
    target's q rows come from the source's q rows (a plain selection over 3C rows would mix them)."""
    chunks = weight.chunk(3, dim=0)
    target = (shape[0] // 3, *shape[1:])
    return torch.cat([uniform_element_selection(c, target) for c in chunks], dim=0)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """torch.load a state_dict (tensors only); unwraps {'model': ...}/{'state_dict': ...}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DINOv2 checkpoint not found: {path} (expected a DINOv2-Base "
                                f"state_dict such as dinov2_vitb14_pretrain.pth; see "
                                f"`mergevq fetch-weights`)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (dict of tensors), got {type(state).__name__}")
    return state


@torch.no_grad()
def init_from_dinov2(encoder: MergeVQEncoder, path: str | Path) -> list[str]:
    """Initialise the encoder's attention blocks and cls token from a DINOv2 state_dict.

    The file holds timm / facebookresearch DINOv2 keys (`blocks.{i}.norm1.weight`,
    `blocks.{i}.attn.qkv.weight`, `blocks.{i}.ls1.gamma`, `blocks.{i}.mlp.fc1.weight`, ...,
    `cls_token`), which ToMeBlock's parameter names mirror. Target block i takes source block i
    (Xu et al.'s first-N layer selection when the encoder is shallower); each tensor takes evenly
    spaced elements of the source tensor along every dimension, qkv per q/k/v chunk. Positional
    and patch embeddings are not transferred: the token grid and the stem differ.
    Returns the names of the initialised encoder parameters. Raises FileNotFoundError naming a
    missing file, KeyError naming a missing key.
    """
    state = load_state_dict_file(path)
    num_source = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if num_source < len(encoder.blocks):
        raise ValueError(f"{path}: holds {num_source} blocks, the encoder has {len(encoder.blocks)}")
    targets = {f"blocks.{i}.{name}": p for i, block in enumerate(encoder.blocks)
               for name, p in block.named_parameters()}
    targets["cls_token"] = encoder.cls_token
    loaded = []
    for key, param in targets.items():
        if key not in state:
            raise KeyError(f"{path}: no tensor {key!r} for weight selection "
                           f"(is this a DINOv2 ViT state_dict?)")
        source = state[key].float()
        select = _select_qkv if key.endswith("attn.qkv.weight") or key.endswith("attn.qkv.bias") \
            else uniform_element_selection
        param.copy_(select(source, tuple(param.shape)).to(param.dtype))
        loaded.append(key)
    return loaded
