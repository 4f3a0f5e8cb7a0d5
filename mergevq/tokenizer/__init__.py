"""MergeVQ tokenizer: token-merging encoder, LFQ quantiser, source recovery and decoder.

Data flow (Sec. 3, Eq. 1-15):
    images --encoder--> Z_K, S (K x L), cls feature
    Z_K --LFQ--> Z_Kq --SourceRecovery--> logits of S_hat (loss Eq. 11)
    Z_L = S^T Z_Kq (Eq. 14; S_hat at inference) --decoder--> reconstruction

`build_tokenizer(variant, **overrides)` builds a preset: "G", "G+R", "R" (Table A1, 256 px, 2^18
codes) and "G-demo", "G+R-demo", "R-demo" (32 px, 2^10 codes, a few hundred CPU steps).
`TokenizerConfig` is the whole hyperparameter set; save `dataclasses.asdict(model.config)` in a
checkpoint and rebuild with `MergeVQ(TokenizerConfig(**saved))`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from mergevq.tokenizer.decoder import MergeVQDecoder
from mergevq.tokenizer.encoder import EncoderOutput, MergeVQEncoder, init_from_dinov2
from mergevq.tokenizer.lfq import LFQ, LFQOutput
from mergevq.tokenizer.recovery import (SourceRecovery, source_from_logits, source_recovery_loss,
                                        token_recovery)

__all__ = [
    "EncoderOutput", "LFQ", "LFQOutput", "MergeVQ", "MergeVQDecoder", "MergeVQEncoder",
    "MergeVQOutput", "PRESETS", "SourceRecovery", "TokenizerConfig", "build_tokenizer",
    "init_from_dinov2", "source_from_logits", "source_recovery_loss", "token_recovery",
    "tokenizer_config",
]


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TokenizerConfig:
    """Hyperparameters of one MergeVQ tokenizer (defaults: variant G of Table A1)."""

    name: str = "G"
    resolution: int = 256
    bits: int = 18  # LFQ channels, codebook 2^bits
    kept: int = 256  # the variant's target K (Table A1 "Keep token number")
    schedule: str = "tome"  # merge-schedule kind, see tome.merge_schedule
    # encoder: "cnn" = MAGVIT-v2 CNN + ToMe blocks (G, G+R); "vit" = patch embedding + ToMe (R)
    encoder: str = "cnn"
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 4  # per CNN stage
    patch_size: int = 16  # "vit" only
    dim: int | None = None  # attention width; None = the deepest CNN width ch * ch_mult[-1]
    depth: int = 12  # attention (ToMe) blocks
    heads: int = 8
    # decoder: the mirror of a hybrid encoder, no merging
    dec_ch: int = 64
    dec_ch_mult: tuple[int, ...] = (1, 2, 4, 8)
    dec_num_res_blocks: int = 4
    dec_extra_res_blocks: int = 1  # added in every stage but the shallowest
    dec_dim: int | None = None  # None = dec_ch * dec_ch_mult[-1]
    dec_depth: int = 12
    dec_heads: int = 8
    # the authors' `with_dw_conv=True`: depth-wise 3x3 conv positional encoding + MixMlp blocks;
    # False = learned absolute positional embedding + plain MLPs (see decoder.py)
    dec_dw_conv: bool = True
    # both transformers
    mlp_ratio: float = 4.0
    layer_scale_init: float | None = 1e-5
    # Source Recovery (Table A2)
    rec_dim: int = 384
    rec_depth: int = 2
    rec_heads: int = 8
    rec_ffn: int = 1536
    rec_use_order: bool = True  # Source Recovery sees the tokens' relative rank (see recovery.py)
    # LFQ entropy penalty
    entropy_temperature: float = 0.01
    codebook_entropy: str = "exact"  # "exact" or "subcodebook" (the upper bound; see lfq.py)
    entropy_group_bits: int = 9  # sub-codebook size of the "subcodebook" kind
    # attention blocks start from DINOv2-Base by weight selection (G, G+R); the trainer calls
    # init_from_dinov2 with the weights file, building never reads files
    dinov2_init: bool = False

    def __post_init__(self):
        # lists arrive from YAML / JSON checkpoints; the dataclass stays hashable with tuples
        for key in ("ch_mult", "dec_ch_mult"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        if self.encoder not in ("cnn", "vit"):
            raise ValueError(f"TokenizerConfig {self.name}: encoder must be 'cnn' or 'vit', "
                             f"got {self.encoder!r}")
        if self.encoder == "vit" and self.dim is None:
            raise ValueError(f"TokenizerConfig {self.name}: a 'vit' encoder needs dim")
        dec_factor = 2 ** (len(self.dec_ch_mult) - 1)
        if dec_factor != self.factor:
            raise ValueError(f"TokenizerConfig {self.name}: the encoder downsamples by "
                             f"{self.factor} but the decoder upsamples by {dec_factor}")
        if self.resolution % self.factor:
            raise ValueError(f"TokenizerConfig {self.name}: resolution {self.resolution} is not "
                             f"divisible by the downsampling factor {self.factor}")
        if not 1 <= self.kept <= self.num_tokens:
            raise ValueError(f"TokenizerConfig {self.name}: kept={self.kept} not in "
                             f"[1, {self.num_tokens}]")

    @property
    def factor(self) -> int:
        """Downsampling factor f of E_1."""
        return self.patch_size if self.encoder == "vit" else 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.resolution // self.factor

    @property
    def num_tokens(self) -> int:
        """L, tokens before merging."""
        return self.grid ** 2


_G = TokenizerConfig(name="G", dinov2_init=True)
_GR = dataclasses.replace(_G, name="G+R", kept=144, ch_mult=(1, 1, 2, 4, 8),
                          dec_ch_mult=(1, 1, 2, 4, 8))
# Table A1's R: ViT-B (12 heads of 64 at width 768, the standard ViT-B / DINOv2-B split; the
# authors' configs write 8 heads for every variant), random init, and G+R's decoder.
_R = dataclasses.replace(_GR, name="R", kept=36, encoder="vit", patch_size=16, dim=768,
                         heads=12, dinov2_init=False)

# Demo presets: 32 px, 2^10 codes. CNN width 16 with the paper's multipliers cut to the demo's
# depth (G: [1, 2] -> f = 2, 256 tokens; G+R: [1, 1, 2] -> f = 4, 64 tokens), one residual block
# per encoder stage (+1 per decoder stage but the shallowest); 4 attention blocks of width 64
# (4 heads of 16), reached from the 32-wide CNN by a linear embedding; R: ViT with 4x4 patches
# (64 tokens) at width 64 and G+R-demo's decoder; Source Recovery 2 layers of width 64.
_DEMO = dict(resolution=32, bits=10, ch=16, num_res_blocks=1, dim=64, depth=4, heads=4,
             dec_ch=16, dec_num_res_blocks=1, dec_dim=64, dec_depth=4, dec_heads=4, rec_dim=64,
             rec_depth=2, rec_heads=4, rec_ffn=256, entropy_group_bits=5, dinov2_init=False)
_G_DEMO = TokenizerConfig(name="G-demo", kept=64, ch_mult=(1, 2), dec_ch_mult=(1, 2), **_DEMO)
_GR_DEMO = TokenizerConfig(name="G+R-demo", kept=36, ch_mult=(1, 1, 2), dec_ch_mult=(1, 1, 2),
                           **_DEMO)
_R_DEMO = dataclasses.replace(_GR_DEMO, name="R-demo", kept=9, encoder="vit", patch_size=4)

PRESETS: dict[str, TokenizerConfig] = {c.name: c for c in (_G, _GR, _R, _G_DEMO, _GR_DEMO, _R_DEMO)}
# TokenizerConfig fields added after artefacts were first saved, with the value those artefacts had
LEGACY_FIELDS = {"dec_dw_conv": False, "codebook_entropy": "subcodebook"}


def tokenizer_config(variant: str, **overrides) -> TokenizerConfig:
    """The preset `variant` with fields replaced by `overrides` (e.g. bits=10, schedule="square")."""
    if variant not in PRESETS:
        raise ValueError(f"unknown tokenizer variant {variant!r}; presets: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TokenizerConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown TokenizerConfig field(s) {unknown}; fields: {sorted(fields)}")
    return dataclasses.replace(PRESETS[variant], **overrides)


# ---------------------------------------------------------------------------------------------
# The tokenizer


class MergeVQOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, 3, H, W)
    encoded: EncoderOutput
    quant: LFQOutput
    source_logits: torch.Tensor  # (B, L, K), softmax over K = S_hat^T (Eq. 10)
    source_loss: torch.Tensor  # scalar fp32, Eq. (11)


class MergeVQ(nn.Module):
    """Encoder -> LFQ -> (Source Recovery, token recovery) -> decoder."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        c = config
        self.config = c
        self.encoder = MergeVQEncoder(
            resolution=c.resolution, bits=c.bits, kind=c.encoder, ch=c.ch, ch_mult=c.ch_mult,
            num_res_blocks=c.num_res_blocks, patch_size=c.patch_size, dim=c.dim,
            depth=c.depth, num_heads=c.heads,
            mlp_ratio=c.mlp_ratio, layer_scale_init=c.layer_scale_init, schedule=c.schedule)
        self.quantizer = LFQ(c.bits, c.entropy_temperature, c.entropy_group_bits,
                             codebook_entropy=c.codebook_entropy)
        self.recovery = SourceRecovery(c.num_tokens, c.bits, c.rec_dim, c.rec_depth, c.rec_heads,
                                       c.rec_ffn, c.rec_use_order)
        self.decoder = MergeVQDecoder(
            resolution=c.resolution, bits=c.bits, ch=c.dec_ch, ch_mult=c.dec_ch_mult,
            num_res_blocks=c.dec_num_res_blocks, extra_res_blocks=c.dec_extra_res_blocks,
            dim=c.dec_dim, depth=c.dec_depth, num_heads=c.dec_heads, mlp_ratio=c.mlp_ratio,
            layer_scale_init=c.layer_scale_init, dw_conv=c.dec_dw_conv)

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def grid(self) -> int:
        return self.config.grid

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (Table A1 counts encoder and decoder; Table A2 the recovery)."""
        parts = {"encoder": self.encoder, "quantizer": self.quantizer, "recovery": self.recovery,
                 "decoder": self.decoder}
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        counts["total"] = sum(counts.values())
        return counts

    def encode(self, images: torch.Tensor, kept: int) -> EncoderOutput:
        """images (B, 3, H, W) in [-1, 1] -> EncoderOutput with K = kept tokens (Eq. 3)."""
        return self.encoder(images, kept)

    def decode(self, quantized: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """quantized Z_Kq (B, K, D), source (B, K, L) -> images (B, 3, H, W) (Eq. 13-15)."""
        return self.decoder(token_recovery(quantized, source))

    def forward(self, images: torch.Tensor, kept: int, predicted_source: bool = False,
                source_grad_to_encoder: bool = True, source_loss_type: str = "bce") -> MergeVQOutput:
        """images (B, 3, H, W) -> MergeVQOutput.

        predicted_source: recover tokens with S_hat from Source Recovery (inference, Sec. 3.3)
        instead of the encoder's S (training). source_grad_to_encoder: let Eq. (11) train the
        encoder through the straight-through quantiser; False trains only the recovery model.
        """
        encoded = self.encoder(images, kept)
        quant = self.quantizer(encoded.z)  # Eq. (4)
        recovery_in = quant.quantized if source_grad_to_encoder else quant.quantized.detach()
        logits = self.recovery(recovery_in)  # Eq. (9)
        source_loss = source_recovery_loss(logits, encoded.source, source_loss_type)  # Eq. (11)
        source = source_from_logits(logits.detach()) if predicted_source else encoded.source
        reconstruction = self.decode(quant.quantized, source)
        return MergeVQOutput(reconstruction, encoded, quant, logits, source_loss)


def build_tokenizer(variant: str, **overrides) -> MergeVQ:
    """MergeVQ for a preset ("G", "G+R", "R", "G-demo", "G+R-demo", "R-demo") with field overrides.

    Works under `with torch.device("meta"):` (nothing is read or computed from data at build time).
    """
    return MergeVQ(tokenizer_config(variant, **overrides))


def load_tokenizer(path: str | Path, weights: str = "ema", map_location="cpu") -> tuple[MergeVQ, dict]:
    """Rebuild a tokenizer from a stage-1 model.pt; returns (model in eval mode, the artefact dict)."""
    from mergevq.files import load_checkpoint

    art = load_checkpoint(path, map_location=map_location, weights_only=False)
    # fields an artefact saved before they existed was built without (their earlier behaviour)
    saved = LEGACY_FIELDS | art["tokenizer_config"]
    model = MergeVQ(TokenizerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}))
    model.load_state_dict(art[weights])
    return model.eval(), art
