"""Multiply-accumulate counts, the unit of Table A1's "FLOPs", with torch's FlopCounterMode.

Table A1 (like most vision papers) reports fvcore's numbers, and fvcore counts one "flop" per
multiply-accumulate (MAC). ``torch.utils.flop_counter.FlopCounterMode`` counts two (a multiply and
an add), so its counts are halved here: ``count_macs`` of nn.Linear(64, 32) on (8, 64) is
8 * 64 * 32 = 16384.

What is counted: matrix products (mm, addmm, bmm, baddbmm), convolutions and attention kernels,
from shapes alone. Not counted: activations, normalisations, softmax, pooling, interpolation,
elementwise ops, ToMe's gathers and scatters (fvcore's defaults count norms and upsampling too, so
expect small differences against fvcore on norm-heavy CNNs; both ignore the rest).
Attention: torch's registry lacks the CPU fused kernel ``_scaled_dot_product_flash_attention_for_cpu``
(F.scaled_dot_product_attention on CPU counts 0 without it), so it is added here with torch's own
SDPA formula; causal masks are counted as full attention, as torch's formula does.
Bias additions are not counted (fvcore does not count them either).

Meta device: works. FlopCounterMode derives every count from shapes, so a module built under
``torch.device("meta")`` and fed meta tensors is counted without allocating its weights or
computing anything (tested): the 256-px paper models can be counted on any machine. On meta,
SDPA decomposes into plain matrix products and is counted through them, with the same total.

The module runs once under ``torch.no_grad()``; its train/eval mode is left as the caller set it
(ToMe merging or dropout may depend on it).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def _flop_counts(module: nn.Module, inputs: tuple, kwargs: dict) -> dict[str, dict[Any, int]]:
    counter = FlopCounterMode(display=False, depth=None, custom_mapping=_EXTRA_FORMULAS)
    with counter, torch.no_grad():
        module(*inputs, **kwargs)
    return counter.get_flop_counts()


def count_macs(module: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """Multiply-accumulates of one ``module(*inputs, **kwargs)`` call (torch FLOPs / 2, fvcore's unit)."""
    flops = sum(_flop_counts(module, inputs, kwargs).get("Global", {}).values())
    return flops // 2


def macs_by_module(module: nn.Module, *inputs: Any, **kwargs: Any) -> dict[str, int]:
    """MACs per submodule of one call, keyed by qualified name as in ``named_modules()`` ("" = the root).

    A module's count includes its children's. Modules that do no counted work are absent.
    """
    out: dict[str, int] = {}
    for name, ops in _flop_counts(module, inputs, kwargs).items():
        if name == "Global":
            continue
        # FlopCounterMode prefixes every name with the root's class name ("MergeVQ.encoder.blocks.0").
        qualified = name.split(".", 1)[1] if "." in name else ""
        out[qualified] = out.get(qualified, 0) + sum(ops.values()) // 2
    return out
