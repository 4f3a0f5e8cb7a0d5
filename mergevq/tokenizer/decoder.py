"""MergeVQ decoder D (Eq. 6 / 15): recovered codes Z_L -> image.

App. A.1: "the corresponding decoder shares a similar architecture as encoders except for using
ToMe modules". Following the authors' MergeVQDecoder (Open-MAGVIT2 lineage):
  3x3 conv from the D code channels to the attention width d (the deepest CNN width in the paper)
  -> positional information and `depth` pre-norm attention blocks without merging; with
     dw_conv=True (the default, the authors' `with_dw_conv=True`) a residual depth-wise 3x3 conv on
     the g x g grid as the positional encoding and "MixMlp" blocks (fc1 -> depth-wise 3x3 conv ->
     GELU -> fc2); with dw_conv=False a learned absolute embedding and plain MLPs (this package's
     earlier decoder, kept as an ablation)
  (-> a 1x1 conv to the deepest CNN width, only where a demo preset makes the two differ)
  -> CNN stages from deep to shallow, each entered through an AdaptiveGroupNorm conditioned on the
     code grid, with num_res_blocks (+1 in every stage but the shallowest) residual blocks and a
     depth-to-space (PixelShuffle) x2 upsampling after every stage but the shallowest
  -> GroupNorm, SiLU, 3x3 conv to RGB.
The extra residual blocks and the d -> 4d upsampling convolutions are why Table A1's decoders are
~20M parameters larger than the encoders.

Shapes: B batch, L = g^2 tokens (row-major, p = row * g + col), D = bits, d attention width.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mergevq.tokenizer.encoder import ResBlock, group_norm, init_transformer_weights
from mergevq.tokenizer.tome import Attention, LayerScale, Mlp


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, L, C) in row-major order -> (B, C, g, g), g = sqrt(L)."""
    B, L, C = tokens.shape
    g = int(round(L ** 0.5))
    if g * g != L:
        raise ValueError(f"tokens_to_grid: {L} tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(B, C, g, g)


def grid_dwconv(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A (depth-wise) conv applied to row-major tokens (B, L, C) on their g x g grid -> (B, L, C')."""
    return conv(tokens_to_grid(tokens)).flatten(2).transpose(1, 2)


def depthwise_conv3x3(channels: int) -> nn.Conv2d:
    """3x3 depth-wise conv with bias, trunc-normal(0.02) weights, zero bias (the authors' init)."""
    conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
    nn.init.trunc_normal_(conv.weight, std=0.02)
    nn.init.zeros_(conv.bias)
    return conv


class MixMlp(nn.Module):
    """The authors' MixMlp: fc1 -> depth-wise 3x3 conv on the token grid -> GELU -> fc2.

    forward(x (B, L, C), L = g^2 row-major) -> (B, L, C). The conv mixes each hidden channel over
    the 3x3 neighbourhood, which gives the decoder's attention blocks positional information
    (Xie et al.'s Mix-FFN, SegFormer) without an absolute embedding.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = depthwise_conv3x3(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(grid_dwconv(self.dwconv, self.fc1(x))))


class DecoderBlock(nn.Module):
    """Pre-norm ViT block without merging: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    mlp is MixMlp (dw_conv=True) or a plain Mlp; parameter names follow ToMeBlock (timm's Block),
    and with dw_conv=False the block computes exactly ToMeBlock(x, r=0).
    forward(x (B, L, C), L = g^2 row-major tokens) -> (B, L, C).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 layer_scale_init: float | None = 1e-5, dw_conv: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = (MixMlp if dw_conv else Mlp)(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x))[0])
        return x + self.ls2(self.mlp(self.norm2(x)))


class AdaptiveGroupNorm(nn.Module):
    """MAGVIT-v2's adaptive GroupNorm: GroupNorm without affine, scale and shift from the code.

    The code grid (B, D, g, g) goes through two 1x1 convs (scale, shift) and is resized (nearest) to
    the feature resolution, so every pixel is modulated by the code of the token that covers it.
    (The authors' implementation instead feeds the per-channel mean and std of the whole code grid
    to two linears: a global, not spatial, modulation with the same parameter count.)
    Initialised to the identity modulation (scale 1, shift 0), i.e. a plain GroupNorm.
    """

    def __init__(self, code_dim: int, channels: int):
        super().__init__()
        self.norm = group_norm(channels, affine=False)
        self.scale = nn.Conv2d(code_dim, channels, 1)
        self.shift = nn.Conv2d(code_dim, channels, 1)
        for conv, bias in ((self.scale, 1.0), (self.shift, 0.0)):
            nn.init.zeros_(conv.weight)
            nn.init.constant_(conv.bias, bias)

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w), code (B, D, g, g) with h, w multiples of g -> (B, C, h, w)."""
        code = F.interpolate(code.to(x.dtype), size=x.shape[-2:], mode="nearest")
        return self.norm(x) * self.scale(code) + self.shift(code)


class Upsample(nn.Module):
    """Depth-to-space x2: 3x3 conv C -> 4C, then PixelShuffle(2) to (C, 2h, 2w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


class MergeVQDecoder(nn.Module):
    """D: recovered codes (B, L, D) -> images (B, 3, H, W), H = g * 2^(stages-1)."""

    def __init__(self, *, resolution: int, bits: int, ch: int = 64,
                 ch_mult: tuple[int, ...] = (1, 2, 4, 8), num_res_blocks: int = 4,
                 extra_res_blocks: int = 1, dim: int | None = None, depth: int = 12,
                 num_heads: int = 8, mlp_ratio: float = 4.0,
                 layer_scale_init: float | None = 1e-5, out_channels: int = 3, dw_conv: bool = True):
        super().__init__()
        factor = 2 ** (len(ch_mult) - 1)
        if resolution % factor:
            raise ValueError(f"MergeVQDecoder: resolution {resolution} is not divisible by the "
                             f"upsampling factor {factor}")
        self.resolution = resolution
        self.grid = resolution // factor
        self.num_tokens = self.grid ** 2
        self.bits = bits
        width = ch * ch_mult[-1]
        self.dim = dim = dim or width  # attention width; the paper's is the deepest CNN width

        self.conv_in = nn.Conv2d(bits, dim, 3, padding=1)
        self.dw_conv = dw_conv
        if dw_conv:  # the authors' conditional positional encoding: x + dwconv(x) on the grid
            self.pos_conv = depthwise_conv3x3(dim)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, num_heads, mlp_ratio, layer_scale_init, dw_conv) for _ in range(depth))
        # the demo presets' narrower CNN: a 1x1 projection, the inverse of the encoder's embedding
        self.unembed = nn.Conv2d(dim, width, 1) if dim != width else nn.Identity()

        # Built deep -> shallow; stages[0] is the deepest (runs first).
        self.stages = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.adaptive_norm = AdaptiveGroupNorm(bits, width)
            blocks = []
            for _ in range(num_res_blocks + (extra_res_blocks if i > 0 else 0)):
                blocks.append(ResBlock(width, ch * ch_mult[i]))
                width = ch * ch_mult[i]
            stage.blocks = nn.Sequential(*blocks)
            stage.upsample = Upsample(width) if i > 0 else nn.Identity()
            self.stages.append(stage)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

        init_transformer_weights(self.blocks)  # Linears; the depth-wise convs are initialised above

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, D): recovered codes Z_L (Eq. 14) -> images (B, 3, H, W)."""
        if tokens.shape[1:] != (self.num_tokens, self.bits):
            raise ValueError(f"MergeVQDecoder expects (B, {self.num_tokens}, {self.bits}) recovered "
                             f"tokens, got {tuple(tokens.shape)}")
        code = tokens_to_grid(tokens)  # (B, D, g, g), the AdaptiveGroupNorm condition
        x = self.conv_in(code.to(self.conv_in.weight.dtype))  # (B, d, g, g)
        B, C, g, _ = x.shape
        h = x.flatten(2).transpose(1, 2)  # (B, L, d)
        h = h + (grid_dwconv(self.pos_conv, h) if self.dw_conv else self.pos_embed)
        for block in self.blocks:
            h = block(h)
        x = self.unembed(h.transpose(1, 2).reshape(B, C, g, g))  # (B, width, g, g)
        for stage in self.stages:
            x = stage.adaptive_norm(x, code)
            x = stage.upsample(stage.blocks(x))
        return self.conv_out(F.silu(self.norm_out(x)))
