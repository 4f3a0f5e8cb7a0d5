"""Per-image reconstruction metrics: PSNR, SSIM (pure torch) and LPIPS (local VGG16 trunk).

Value range. Images are float (B, 3, H, W) in [-1, 1] (the project's convention) unless
``value_range=(0.0, 1.0)`` says they are in [0, 1]. Both metrics first map images to [0, 1] and
use data range 1:
* PSNR is unchanged by that mapping (the MSE and the squared data range scale together), so it is
  the usual PSNR of [0, 1] images, equal to PSNR on [-1, 1] with data range 2 and to PSNR on
  [0, 255] with data range 255.
* SSIM is not: its luminance term and its constants depend on the absolute range, so the range is
  fixed to [0, 1] as in the common implementations (skimage with data_range=1, pytorch-msssim).
Metrics are of the float images given; to score saved uint8 images, quantise first
(``mergevq.data.datasets.to_uint8`` then ``to_unit_range``). Images are not clamped: a
reconstruction outside the range is scored as it is.

SSIM follows Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5 applied without padding
(only fully covered positions, as the reference MATLAB code and pytorch-msssim do), K1 = 0.01,
K2 = 0.03, the SSIM map averaged over positions for each channel and then over channels.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# PSNR, SSIM
# ---------------------------------------------------------------------------------------------


def _to_unit(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    return (x.float() - lo) / (hi - lo)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"expected two image batches (B, C, H, W) of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def psnr(x: torch.Tensor, y: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Per-image PSNR in dB: x, y (B, C, H, W) in value_range -> (B,); inf where x == y.

    PSNR = 10 log10(1 / MSE) of the images mapped to [0, 1].
    """
    _check_pair(x, y)
    mse = (_to_unit(x, value_range) - _to_unit(y, value_range)).pow(2).flatten(1).mean(1)  # (B,)
    return -10.0 * torch.log10(mse)  # log10(0) = -inf -> +inf for identical images


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian (size,)."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image SSIM: x, y (B, C, H, W) in value_range -> (B,); 1 where x == y.

    Gaussian-weighted local means, variances and covariance over 'valid' window positions;
    SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
    C1 = (K1 L)^2, C2 = (K2 L)^2 with L = 1 (images mapped to [0, 1]).
    """
    _check_pair(x, y)
    b, c, h, w = x.shape
    if h < window_size or w < window_size:
        raise ValueError(
            f"SSIM with a {window_size}x{window_size} window needs images at least that large, got {h}x{w}"
        )
    x, y = _to_unit(x, value_range), _to_unit(y, value_range)
    g = gaussian_window(window_size, sigma, x.dtype, x.device)
    kv, kh = g.view(1, 1, -1, 1).expand(c, 1, -1, 1), g.view(1, 1, 1, -1).expand(c, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable depthwise Gaussian, no padding
        return F.conv2d(F.conv2d(t, kv, groups=c), kh, groups=c)  # (B, C, H-ws+1, W-ws+1)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)  # per channel, then over channels


# ---------------------------------------------------------------------------------------------
# LPIPS with a local VGG16 trunk
# ---------------------------------------------------------------------------------------------
def load_vgg16_trunk(trunk: nn.Module, path: str | os.PathLike) -> None:
    """Copy the conv layers of a torchvision VGG16 state_dict file into lpips' vgg16 trunk.

    lpips splits torchvision's ``features`` into slice1..slice5 but keeps the layer indices, so
    ``features.{i}.{weight,bias}`` maps to ``slice{s}.{i}.{weight,bias}``. The classifier entries of
    the file are not needed and ignored.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a torchvision VGG16 state_dict, got {type(state).__name__}")
    wanted = {}
    for name in trunk.state_dict():
        _, index, param = name.split(".")  # "slice1.0.weight"
        key = f"features.{index}.{param}"
        if key not in state:
            raise ValueError(f"{path}: not a torchvision VGG16 state_dict (no {key!r})")
        wanted[name] = state[key]
    try:
        trunk.load_state_dict(wanted, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: VGG16 weights do not fit lpips' trunk: {exc}") from None


class LPIPS(nn.Module):
    """LPIPS distance (lpips package, net='vgg', v0.1): x, y (B, 3, H, W) in [-1, 1] -> (B,).

    The learned linear heads ship inside the lpips package (pretrained=True); the VGG16 trunk is
    built random (pnet_rand=True, so nothing is downloaded) and then loaded from the local
    torchvision VGG16 state_dict at ``vgg16_weights`` (config ``weights.vgg16``). Frozen and always
    in eval mode (the heads hold dropout layers). Gradients flow to the inputs, so it serves as the
    perceptual loss too.
    """

    def __init__(self, vgg16_weights: str | os.PathLike | None):
        super().__init__()
        path = Path(vgg16_weights) if vgg16_weights is not None else None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"VGG16 weights for LPIPS not found: {path} (config weights.vgg16); "
                "`mergevq fetch-weights` downloads them"
            )
        import lpips

        with warnings.catch_warnings():  # lpips builds its trunk through torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        load_vgg16_trunk(self.lpips.net, path)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a parent's .train() must not switch on the heads' dropout

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y)
        return self.lpips(x, y).flatten()  # lpips returns (B, 1, 1, 1)

