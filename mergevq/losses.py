"""Stage-1 losses beyond the tokenizer's own: LPIPS perceptual loss and the global alignment of
Eq. (12) with either a frozen DINOv2 teacher or a DINO-style EMA self-distillation teacher.

Pretrained networks are read from local files only (config `weights.*`, downloaded once by
`mergevq fetch-weights`); a missing file is an error, never a silently random network.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mergevq.train.distributed import all_reduce_mean
from mergevq.train.ema import unwrap

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _require_file(path: str | os.PathLike | None, what: str, key: str) -> Path:
    if path is None:
        raise FileNotFoundError(
            f"{what} needs local weights but config `{key}` is null; run `mergevq fetch-weights` "
            f"(needs internet) and set `{key}` to the downloaded file"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: weights file {path} (config `{key}`) not found; "
                                f"run `mergevq fetch-weights` to download it")
    return path


# ---------------------------------------------------------------------------------------------
# Perceptual loss: LPIPS with a VGG16 trunk
# ---------------------------------------------------------------------------------------------


class PerceptualLoss(nn.Module):
    """LPIPS-VGG16 (Zhang et al. 2018), frozen and always in eval mode.

    The calibrated linear heads ship inside the `lpips` package (weights/v0.1/vgg.pth); the VGG16
    trunk comes from torchvision's ImageNet checkpoint at `vgg16_path` (vgg16-397923af.pth), so
    nothing is downloaded. Both loads are checked key by key: a partially random LPIPS would give
    plausible-looking but meaningless numbers.

    forward(x, y (B,3,H,W) in [-1,1]) -> scalar mean over the batch, or (B,) with reduction="none".
    """

    def __init__(self, vgg16_path: str | os.PathLike | None):
        super().__init__()
        import lpips

        path = _require_file(vgg16_path, "LPIPS perceptual loss (VGG16 trunk)", "weights.vgg16")
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
            warnings.simplefilter("ignore")
            net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
        heads_path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
        heads = torch.load(heads_path, map_location="cpu", weights_only=True)
        # `lins` is a ModuleList aliasing lin0..lin4, so only the lin{i} names are distinct tensors.
        lin_keys = {k for k in net.state_dict() if k.startswith("lin") and not k.startswith("lins.")}
        if set(heads) != lin_keys:
            raise RuntimeError(f"LPIPS heads {heads_path} do not match the lpips VGG model: "
                               f"file has {sorted(heads)}, model expects {sorted(lin_keys)}")
        net.load_state_dict(heads, strict=False)

        try:
            trunk = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise RuntimeError(f"cannot read the VGG16 weights {path}: {exc}") from exc
        trunk = trunk.get("state_dict", trunk)
        mapped = {}
        # lpips' vgg16 keeps torchvision's `features[i]` as `slice{s}.{i}`: same index, new parent.
        for name in net.net.state_dict():
            src = "features." + name.split(".", 1)[1]
            if src not in trunk:
                raise RuntimeError(f"{path} is not a torchvision VGG16 state_dict: missing {src!r}")
            mapped[name] = trunk[src]
        net.net.load_state_dict(mapped, strict=True)

        self.lpips = net
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        # The heads contain Dropout; LPIPS is only defined in eval mode.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        d = self.lpips(x, y).flatten()  # (B,)
        if reduction == "none":
            return d
        if reduction == "mean":
            return d.mean()
        raise ValueError(f"reduction {reduction!r} is not 'mean' or 'none'")


# ---------------------------------------------------------------------------------------------
# Global alignment, Eq. (12)
# ---------------------------------------------------------------------------------------------


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """-sum_c p_teacher(c) log p_student(c), averaged over the batch. student_logits (B,C) are
    already divided by their temperature; teacher_probs (B,C) rows sum to 1 and are not differentiated."""
    return -(teacher_probs.detach() * F.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()


def alignment_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Eq. (12) at the knowledge-distillation scale: T^2 * (-P(v)^T log P(u)), P = softmax(logits / T);
    student (B,C) on view u, teacher (B,C) on view v, averaged over the batch.

    The authors' `distill_cls_loss` computes KL(P_teacher || P_student) * T^2 at T = 4. KL = CE -
    H(P_teacher), and the teacher entropy does not depend on the student, so the gradients are
    identical; CE is what Eq. (12) writes (its value is larger by T^2 H(P_teacher), so logged
    numbers differ from theirs). The T^2 (Hinton et al.'s convention, which the authors follow)
    keeps the gradient's size independent of T: without it Table A1's weights would act at 1/16 of
    their strength at T = 4.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    teacher_probs = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return soft_cross_entropy(student_logits / temperature, teacher_probs) * temperature**2


class DINOv2Teacher(nn.Module):
    """Frozen DINOv2 encoder (`teacher: dinov2`) giving the target P(v) of Eq. (12).

    Built as timm's `vit_base_patch14_dinov2` at 224 px without a classifier and loaded from the
    local checkpoint (the official dinov2_vitb14_pretrain.pth or a timm state_dict). timm's
    checkpoint filter converts the official layout (drops mask_token) and resamples the 518-px
    (37x37) position embedding to the 16x16 grid of 224 px, bicubically.

    forward(images (B,3,H,W) in [-1,1]) -> (B, embed_dim) pooled output (final-norm CLS token;
    768 for ViT-B). Images are normalised with ImageNet mean/std and resized to img_size.
    `model_name` and `model_kwargs` (passed to timm.create_model, e.g. depth) exist so tests can use
    a smaller DINOv2 of the same family.
    """

    def __init__(self, path: str | os.PathLike | None, model_name: str = "vit_base_patch14_dinov2",
                 img_size: int = 224, model_kwargs: dict | None = None):
        super().__init__()
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        path = _require_file(path, "DINOv2 alignment teacher", "weights.dinov2_base")
        self.img_size = img_size
        self.model = timm.create_model(model_name, pretrained=False, img_size=img_size, num_classes=0,
                                       **(model_kwargs or {}))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"cannot read the DINOv2 checkpoint {path}: {exc}") from exc
        try:
            state = checkpoint_filter_fn(state, self.model)
            self.model.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise RuntimeError(f"{path} does not fit timm's {model_name}: {exc}") from exc
        self.embed_dim = self.model.num_features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DINOv2Teacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1.0) / 2.0
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False,
                              antialias=True)
        x = (x - self.mean) / self.std
        return self.model(x)


# ---------------------------------------------------------------------------------------------
# Projection head and EMA self-distillation (`teacher: ema`, no downloaded weights)
# ---------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """Linear-GELU-Linear-GELU-Linear, optionally to a bottleneck, then the output layer.

    forward(x (B, in_dim)) -> logits (B, out_dim).
    normalize=True is DINO's head (to a bottleneck, L2-normalise, a weight-normed last layer with its
    gain frozen at 1, so logits lie in [-1, 1] and the temperatures 0.1 / 0.04 set their
    sharpness): use it with EMASelfDistillation.
    normalize=False leaves unbounded logits that can match a frozen teacher's pooled features at
    temperature 4 (out_dim = the teacher's embed_dim). bottleneck_dim=None is the authors'
    `dist_head: layer3` (Linear(d, 4d), GELU, Linear(4d, 4d), GELU, Linear(4d, out_dim) with
    hidden_dim = 4d); an integer adds a Linear(hidden, bottleneck) before the output layer.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int | None = 256,
                 normalize: bool = True):
        super().__init__()
        if normalize and bottleneck_dim is None:
            raise ValueError("ProjectionHead: normalize=True (DINO's head) needs a bottleneck_dim")
        self.normalize = normalize
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        if bottleneck_dim is not None:
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last_in = hidden_dim if bottleneck_dim is None else bottleneck_dim
        if normalize:
            self.last = nn.utils.parametrizations.weight_norm(nn.Linear(last_in, out_dim, bias=False))
            gain = self.last.parametrizations.weight.original0
            gain.data.fill_(1.0)
            gain.requires_grad_(False)  # DINO's norm_last_layer: stabilises early training
        else:
            self.last = nn.Linear(last_in, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        if self.normalize:
            x = F.normalize(x, dim=-1)
        return self.last(x)


class EMASelfDistillation(nn.Module):
    """Offline teacher for Eq. (12) without DINOv2 weights: DINO self-distillation (Caron et al. 2021).

    `student` is the module whose output the loss trains: images -> head logits, i.e. the encoder's
    global (CLS) feature followed by a ProjectionHead(normalize=True). The teacher is an EMA copy of
    it. Per step, with two augmented views u and v of the same images (Eq. 12):
        s = student(u)                      # gradients flow
        t = distill.teacher_forward(v)      # no gradients
        loss = distill.loss(s, t)           # centering + sharpening, then centre update
        ... optimiser step ...
        distill.update(student)             # EMA step of the teacher weights
    Centering (subtracting an EMA of the teacher's mean output, all-reduced under DDP) and
    sharpening (teacher temperature below the student's) are what keep the EMA teacher from
    collapsing to a constant or uniform output. The teacher weights and the centre are in
    state_dict, so resume is exact.
    """

    def __init__(self, student: nn.Module, out_dim: int, momentum: float = 0.996, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, center_momentum: float = 0.9):
        super().__init__()
        if not teacher_temp < student_temp:
            raise ValueError(f"teacher_temp {teacher_temp} must be below student_temp {student_temp} (sharpening)")
        self.momentum = momentum
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        self.teacher = copy.deepcopy(unwrap(student)).eval()
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def train(self, mode: bool = True) -> "EMASelfDistillation":
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_forward(self, *args, **kwargs) -> torch.Tensor:
        return self.teacher(*args, **kwargs)

    def loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, update_center: bool = True) -> torch.Tensor:
        """Eq. (12) with DINO's centering and sharpening. student_out, teacher_out (B, out_dim) raw logits."""
        if student_out.shape[-1] != self.center.shape[-1]:
            raise ValueError(f"logits have {student_out.shape[-1]} classes, the centre {self.center.shape[-1]}")
        teacher_out = teacher_out.detach().float()
        teacher_probs = F.softmax((teacher_out - self.center) / self.teacher_temp, dim=-1)
        loss = soft_cross_entropy(student_out / self.student_temp, teacher_probs)
        if update_center and self.training:
            self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = all_reduce_mean(teacher_out.detach().float().mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center * (1.0 - self.center_momentum))

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student; buffers copied."""
        src = unwrap(student)
        t_params = dict(self.teacher.named_parameters())
        for name, p in src.named_parameters():
            t_params[name].lerp_(p.detach().to(t_params[name].dtype), 1.0 - self.momentum)
        t_buffers = dict(self.teacher.named_buffers())
        for name, b in src.named_buffers():
            t_buffers[name].copy_(b)
