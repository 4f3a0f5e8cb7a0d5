"""Item 4: tokenizer training efficiency, one step's FLOPs per second as a share of the machine's
matmul rate (model FLOPs utilisation, MFU).

One step is exactly what `fit` calls: `TokenizerStage.train_step` (generator forward + backward with
every loss of the config, AdamW, EMA, and the discriminator's step once the GAN is on; the step
index is the config's `gan_start`, so it is a step with the GAN). Its FLOPs are counted by
torch.utils.flop_counter (forward and backward matrix products and convolutions) during the first,
untimed step; the timed steps follow (and, when the goal is missed, one more step of each case
under torch.profiler). The matmul rate is a dense (n x n) product in the step's dtype (fp32 on
CPU; bf16 on CUDA with `precision: bf16`), measured in the same run.

Pretrained networks the config names (DINOv2-Base for Eq. (12) and the weight selection, VGG16 for
LPIPS) are not available offline: random-init files of the same architectures stand in (identical
arithmetic), written to a temporary directory. The demo's SSL teacher likewise.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mergevq.bench.report import Goal, ItemResult
from mergevq.bench.scale import BenchScale, TrainCase
from mergevq.bench.timing import alternate, matmul_rate, profile_top
from mergevq.bench.tome import digit_images
from mergevq.config import REPO_ROOT, load_config, variant_config
from mergevq.eval.flops import _EXTRA_FORMULAS
from mergevq.files import torch_save
from mergevq.tokenizer import tokenizer_config
from mergevq.train.distributed import DistEnv
from mergevq.train.tokenizer import TokenizerStage

MFU_GOAL = 0.30


def stand_in_weights(cfg: dict, variant: str, tmp: Path) -> tuple[str | None, list[str]]:
    """Point cfg["weights"] at random-init stand-ins for the pretrained files the variant's step
    reads. Returns the SSL teacher artefact's path when the variant aligns to one (else None) and
    the names of the stand-ins."""
    vc = variant_config(cfg, variant)
    made = []
    loss = vc["loss"]
    aligns = loss["align"] > 0
    dinov2_init = tokenizer_config(vc["preset"], **vc.get("model_overrides", {})).dinov2_init
    if (aligns and loss["teacher"] == "dinov2") or dinov2_init:
        import timm

        model = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)
        torch_save(model.state_dict(), tmp / "dinov2_stand_in.pth")
        cfg["weights"]["dinov2_base"] = str(tmp / "dinov2_stand_in.pth")
        made.append("dinov2_base")
    if loss["perceptual"] > 0:
        import torchvision

        trunk = torchvision.models.vgg16(weights=None).features.state_dict()
        torch_save({f"features.{k}": v for k, v in trunk.items()}, tmp / "vgg16_stand_in.pth")
        cfg["weights"]["vgg16"] = str(tmp / "vgg16_stand_in.pth")
        made.append("vgg16")
    if aligns and loss["teacher"] == "ssl":
        from mergevq.train.ssl_teacher import SSLTeacherConfig, SSLTeacherNet, teacher_artifact

        net = SSLTeacherNet(SSLTeacherConfig(feature_dim=int(cfg["tokenizer"]["ssl_teacher"]["feature_dim"]),
                                             resolution=int(cfg["data"]["resolution"])))
        torch_save(teacher_artifact(net), tmp / "ssl_teacher_stand_in.pt")
        return str(tmp / "ssl_teacher_stand_in.pt"), made + ["ssl_teacher"]
    return None, made


def count_step_flops(step) -> int:
    """FLOPs of one step() as torch.utils.flop_counter counts them (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with counter:
        step()
    return counter.get_total_flops()


def measure_case(case: TrainCase, device: torch.device, rate) -> dict:
    """One case's step: FLOPs, time, and MFU against rate(dtype), the matmul rate in its dtype."""
    cfg = load_config(REPO_ROOT / case.config)
    with tempfile.TemporaryDirectory(prefix="mergevq-bench-") as tmp:
        teacher, stand_ins = stand_in_weights(cfg, case.variant, Path(tmp))
        torch.manual_seed(cfg["seed"])
        stage = TokenizerStage(cfg, case.variant, DistEnv(device=device), teacher_path=teacher)
    batch = case.batch or cfg["tokenizer"]["train"]["batch_size"]
    images, labels = digit_images(batch, cfg["data"]["resolution"], device)
    step_index = max(0, int(stage.ls["gan_start"]))  # the GAN terms are on from here

    def step():
        return stage.train_step((images, labels), step_index)

    flops = count_step_flops(step)  # also the first warm-up step
    times = alternate({"step": step}, case.repeats, device, warmup=max(0, case.warmup - 1))["step"]
    achieved = flops / times.median
    dtype = torch.bfloat16 if stage.autocast else torch.float32
    return {"config": case.config, "variant": case.variant, "preset": stage.vc["preset"], "batch": batch,
            "step_index": step_index, "kept": stage.sampler.sample(step_index, cfg["seed"]),
            "gan_on": stage.use_gan and step_index >= stage.ls["gan_start"],
            "precision": "bf16" if stage.autocast else "fp32",
            "tflops_per_step": flops / 1e12, "time": times.as_dict(), "flops_per_s": achieved,
            "mfu": achieved / rate(dtype), "matmul_dtype": str(dtype).replace("torch.", ""), "step": step,
            "random_stand_ins": stand_ins}


def run(scale: BenchScale, device: torch.device) -> ItemResult:
    rates: dict[torch.dtype, dict] = {}

    def rate(dtype: torch.dtype) -> float:
        if dtype not in rates:
            rates[dtype] = matmul_rate(device, dtype, scale.matmul_n if device.type == "cpu" else scale.matmul_n_cuda)
        return rates[dtype]["flops_per_s"]

    cases = {c.name: measure_case(c, device, rate) for c in scale.train_cases}
    key = cases["paper"]
    goals = [Goal("train_mfu", key["mfu"], ">=", MFU_GOAL,
                  f"{key['preset']} batch {key['batch']}: {key['tflops_per_step']:.3g} TFLOP/step in "
                  f"{key['time']['median_s']:.3g} s = {key['flops_per_s'] / 1e9:.3g} GFLOP/s vs {key['matmul_dtype']} "
                  f"matmul {key['flops_per_s'] / key['mfu'] / 1e9:.3g} GFLOP/s")]
    steps = {name: c.pop("step") for name, c in cases.items()}
    result = ItemResult({"train_mfu": key["mfu"], "train_mfu_demo": cases.get("demo", {}).get("mfu")},
                        {"matmul": {str(k).replace("torch.", ""): v for k, v in rates.items()}, "cases": cases}, goals)
    if not goals[0].met:  # one more step of each case under the profiler
        result.profile = {name: profile_top(step, device) for name, step in steps.items()}
    return result
