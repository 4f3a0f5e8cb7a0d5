"""Exponential moving average of model weights (Table A1: EMA decay 0.999)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / torch.compile wrapper, or the model itself."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class ModelEMA(nn.Module):
    """EMA copy of a model: ema <- decay * ema + (1 - decay) * model after every optimiser step.

    Floating-point parameters are averaged; buffers (e.g. BatchNorm statistics, integer counters)
    are copied, as in timm's ModelEmaV3 with its default. The copy is frozen and in eval mode;
    use `.module` for evaluation and sampling. state_dict holds the averaged weights and the
    update count, so resume is exact.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        self.module.requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = unwrap(model)
        ema_params = dict(self.module.named_parameters())
        for name, p in src.named_parameters():
            e = ema_params[name]
            if e.dtype.is_floating_point:
                e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)
            else:
                e.copy_(p)
        ema_buffers = dict(self.module.named_buffers())
        for name, b in src.named_buffers():
            ema_buffers[name].copy_(b)
        self.num_updates += 1

    def train(self, mode: bool = True) -> "ModelEMA":
        # The averaged copy is always evaluated, never trained (no dropout, frozen BN statistics).
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
