"""Stage-2 generators on MergeVQ codes: LlamaGen (raster), MergeAR (Sec. 4.1), RandAR (Sec. 4.2).

`build_generator(preset, **overrides)` builds a preset of `PRESETS`; the resolved `GPTConfig` is
`model.config`; save `dataclasses.asdict(model.config)` in a checkpoint (key "generator_config")
and rebuild with `generator_from_config(saved)` or `load_generator(path)`.

Presets (Table A2; the paper's "LlamaGen-L, 343M" is Open-MAGVIT2's factorised AR):
  llamagen-L    24 layers, dim 1024, 16 heads, SwiGLU 2816, 2 intra blocks, 1000 classes + null,
                16 x 16 grid, 18 bits split [6, 12]: 343,570,432 parameters
  llamagen-demo dim 128, 4 layers, 4 heads, 1 intra block, 10 bits [4, 6], 8 x 8 grid, 10 classes
  mergear-L / mergear-demo   the same + the merge-instruction table M (one row per K in [1, L])
  randar-L / randar-demo     the same + one position-instruction vector
Overrides replace fields (e.g. `build_generator("llamagen-demo", codebook_bits=10, grid=8,
num_classes=10)`); the sub-token split follows codebook_bits unless sub_token_bits is given.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.nn as nn

from mergevq.generator.gpt import (FactorisedGPT, GeneratorLoss, GPTConfig, default_bits_split,
                                   merge_codes, split_codes)

__all__ = ["FactorisedGPT", "GPTConfig", "GeneratorLoss", "PRESETS", "build_generator",
           "default_bits_split", "generator_config", "generator_from_config", "load_generator",
           "merge_codes", "split_codes"]

_L = GPTConfig()  # LlamaGen-L (the dataclass defaults)
_DEMO = GPTConfig(n_layer=4, n_head=4, dim=128, multiple_of=32, n_intra_layer=1, codebook_bits=10,
                  num_classes=10, grid=8)

PRESETS: dict[str, GPTConfig] = {
    "llamagen-L": _L,
    "llamagen-demo": _DEMO,
    "mergear-L": dataclasses.replace(_L, kind="mergear"),
    "mergear-demo": dataclasses.replace(_DEMO, kind="mergear"),
    "randar-L": dataclasses.replace(_L, kind="randar"),
    "randar-demo": dataclasses.replace(_DEMO, kind="randar"),
}


def generator_config(preset: str, **overrides) -> GPTConfig:
    """The preset with fields replaced by `overrides`; unknown presets or fields raise."""
    if preset not in PRESETS:
        raise ValueError(f"unknown generator preset {preset!r}; presets: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown GPTConfig field(s) {unknown}; fields: {sorted(fields)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def _model_class(kind: str) -> type[FactorisedGPT]:
    if kind == "llamagen":
        return FactorisedGPT
    if kind == "mergear":
        from mergevq.generator.mergear import MergeAR
        return MergeAR
    if kind == "randar":
        from mergevq.generator.randar import RandAR
        return RandAR
    raise ValueError(f"unknown generator kind {kind!r}")


def generator_from_config(config: GPTConfig | dict) -> FactorisedGPT:
    """Build the model of a GPTConfig (or its `dataclasses.asdict`, e.g. from a checkpoint)."""
    if isinstance(config, dict):
        fields = {f.name for f in dataclasses.fields(GPTConfig)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"saved generator config has unknown field(s) {unknown}")
        config = GPTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    return _model_class(config.kind)(config)


def build_generator(preset: str, **overrides) -> nn.Module:
    """A freshly initialised generator of preset `preset` (see PRESETS)."""
    return generator_from_config(generator_config(preset, **overrides))


def load_generator(path: str | Path, weights: str = "ema", map_location="cpu"):
    """Rebuild a generator from an artefact dict with "generator_config" and a state dict under
    `weights`; returns (model in eval mode, the artefact dict)."""
    from mergevq.files import load_checkpoint

    art = load_checkpoint(path, map_location=map_location, weights_only=False)
    for key in ("generator_config", weights):
        if key not in art:
            raise KeyError(f"{path}: generator artefact has no {key!r} entry (keys: {sorted(art)})")
    model = generator_from_config(art["generator_config"])
    model.load_state_dict(art[weights])
    return model.eval(), art
