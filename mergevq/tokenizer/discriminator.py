"""Adversarial part of stage-1 training: PatchGAN discriminator, GAN losses, LeCam regulariser.

Follows Open-MAGVIT2 (which the authors' code builds on, App. A.1): pix2pix's NLayerDiscriminator
instead of StyleGAN, no gradient penalty, hinge loss for the discriminator, the non-saturating loss
for the generator (the authors' `gen_adv_loss` default; hinge is an option), LeCam regularisation
(weight 0.01, EMA 0.999).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mergevq.train.distributed import all_reduce_mean

# ---------------------------------------------------------------------------------------------
# PatchGAN (pix2pix NLayerDiscriminator, as in taming-transformers / Open-MAGVIT2)
# ---------------------------------------------------------------------------------------------


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # GroupNorm has no batch statistics, so DDP ranks (and CPU gloo runs without SyncBatchNorm)
        # compute the same function of each image.
        return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)
    raise ValueError(f"discriminator norm {kind!r} is not 'batch' or 'group'")


class PatchGANDiscriminator(nn.Module):
    """pix2pix NLayerDiscriminator: 4x4 convs, LeakyReLU 0.2, N(0, 0.02) init.

    forward(images (B, in_channels, H, W) in [-1, 1]) -> logits (B, 1, H', W'), one per patch;
    H' = H/8 - 2 for n_layers=3 (2x2 at 32 px, 30x30 at 256 px; receptive field 70 px).
    With BatchNorm under DDP, convert with nn.SyncBatchNorm.convert_sync_batchnorm if ranks must agree.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        # Convs followed by a norm layer carry no bias (the norm's affine shift replaces it).
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False),
                _norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False),
            _norm(norm, ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def _init_weights(m: nn.Module) -> None:
    # taming's weights_init: convs N(0, 0.02); norm scales N(1, 0.02), shifts 0.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# GAN losses
# ---------------------------------------------------------------------------------------------

GEN_ADV_LOSSES = ("non_saturating", "hinge")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]); any shapes.

    The 0.5 follows taming / Open-MAGVIT2 so that the configured weights mean what they mean there.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss -E[D(x_hat)]."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss E[-log sigmoid(D(x_hat))] = E[softplus(-D(x_hat))] (Goodfellow
    et al. 2014), the authors' default `gen_adv_loss`. Its gradient per logit is -sigmoid(-D)/n:
    strong while the discriminator rejects the fake (D << 0), vanishing once it is fooled."""
    return F.softplus(-logits_fake).mean()


def generator_adversarial_loss(logits_fake: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    """The generator's adversarial loss of `kind` (config tokenizer.loss.gen_adv_loss)."""
    if kind == "non_saturating":
        return non_saturating_g_loss(logits_fake)
    if kind == "hinge":
        return hinge_g_loss(logits_fake)
    raise ValueError(f"gen_adv_loss {kind!r} is not one of {GEN_ADV_LOSSES}")


# ---------------------------------------------------------------------------------------------
# LeCam regularisation (Tseng et al. 2021)
# ---------------------------------------------------------------------------------------------


def lecam_reg(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: torch.Tensor,
              ema_fake: torch.Tensor) -> torch.Tensor:
    """mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2); ema_* are scalars."""
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


class LeCam(nn.Module):
    """LeCam regulariser with EMA anchors of the mean discriminator outputs.

    forward(logits_real, logits_fake, update=True) first moves the anchors towards this batch's
    means (in training mode, when update is True), then returns `lecam_reg` against them, as
    Open-MAGVIT2 does. Under torch.distributed the batch means are all-reduced before the update,
    so every rank holds the same anchors. The anchors are buffers: they live in state_dict, so a
    resumed run continues with exactly the same values.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCam EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        means = torch.stack([logits_real.detach().float().mean(), logits_fake.detach().float().mean()])
        means = all_reduce_mean(means)
        self.ema_real.mul_(self.decay).add_((1 - self.decay) * means[0])
        self.ema_fake.mul_(self.decay).add_((1 - self.decay) * means[1])

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, update: bool = True) -> torch.Tensor:
        if update and self.training:
            self.update(logits_real, logits_fake)
        return lecam_reg(logits_real, logits_fake, self.ema_real, self.ema_fake)


# ---------------------------------------------------------------------------------------------
# VQGAN's adaptive generator weight (off in the paper configs: tokenizer.loss.adaptive_gan)
# ---------------------------------------------------------------------------------------------


def adaptive_generator_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                              factor: float = 1.0, max_weight: float = 1e4) -> torch.Tensor:
    """factor * ||grad nll|| / (||grad g|| + 1e-4), gradients w.r.t. the decoder's last layer weight.

    Detached scalar; both losses must still have their graphs (retain_graph is used). This is
    Esser et al.'s balance between reconstruction and adversarial gradients; Table A1's
    "Discriminator loss 0.8" is this `factor` in the authors' configs.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return (weight.clamp(0.0, max_weight) * factor).detach()
