"""Sizes, repeat counts and time budgets of `mergevq bench`: the issue's full scale, and a tiny one
that runs every item in seconds (tests, smoke runs). `--scale full|tiny` picks one."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Repeats:
    """Timed rounds of an item: at least `min`, more while all rounds fit in `budget_s` (estimated
    from a warm-up round), at most `max`."""

    min: int
    max: int
    budget_s: float


@dataclass(frozen=True)
class TrainCase:
    """One tokenizer training step to measure (item 4)."""

    name: str  # "paper" (holds the `train_mfu` key) or "demo"
    config: str  # config file, relative to the repository root
    variant: str  # tokenizer.variants key
    batch: int | None  # images per step; None = the config's tokenizer.train.batch_size
    repeats: Repeats  # timed steps
    warmup: int  # untimed steps first (the first also counts the FLOPs)


@dataclass(frozen=True)
class BenchScale:
    name: str
    # each item's stated wall-time budget (s, CPU, 2 cores; `mergevq bench` reports any overrun):
    # lfq 90, tome 120, mergear 300, train 240, workflow 60, i.e. 810 s, under the 15 min
    budget_s: dict = field(default_factory=lambda: {"lfq": 90.0, "tome": 120.0, "mergear": 300.0, "train": 240.0,
                                                    "workflow": 60.0})
    # 1. LFQ entropy, forward + backward, on z of shape (images, tokens, bits)
    lfq_bits: int = 18
    lfq_images: int = 8
    lfq_tokens: int = 256
    # the dense side on CPU runs this many images and its time and memory are scaled linearly to
    # lfq_images (all (tokens, 2^18) tensors grow with the token count; 8 images need ~12 GB)
    lfq_dense_images_cpu: int = 1
    lfq_repeats: Repeats = Repeats(3, 10, 30.0)
    # 2. ToMe encoders, forward (no grad), merging to the variant's K vs none (K = L)
    tome_variants: tuple[str, ...] = ("G+R", "R")
    tome_batch_cpu: int = 2
    tome_batch_cuda: int = 32
    tome_repeats: Repeats = Repeats(3, 15, 30.0)  # per variant
    # 3. MergeAR decoding of real code sequences, pruned vs full cache: one decode of each side,
    # in lockstep (see mergevq.bench.mergear)
    codes_tokenizer: str = "G"  # L = 1024 -> K = 256 at 256 px
    # CPU: narrower CNN stages (random weights either way: the codes' duplicate STRUCTURE comes from
    # ToMe's merging of the image's tokens); CUDA: the preset as it is
    codes_tokenizer_cpu_overrides: dict = field(default_factory=lambda: {"ch": 16, "num_res_blocks": 1})
    mergear_cpu: tuple[str, dict] = ("mergear-demo", {"n_layer": 12, "dim": 768, "n_head": 12,
                                                      "codebook_bits": 18, "grid": 32, "num_classes": 10})
    mergear_cuda: tuple[str, dict] = ("mergear-L", {"grid": 32})
    mergear_batch: int = 16
    mergear_warmup_grid: int = 4  # warm-up decode: same widths, a 4 x 4 grid
    # 4. training step FLOPs / s as a share of the matmul rate
    train_cases: tuple[TrainCase, ...] = (
        TrainCase("paper", "config/config.yaml", "G+R", 2, repeats=Repeats(2, 4, 90.0), warmup=1),
        TrainCase("demo", "config/demo.yaml", "G+R", None, repeats=Repeats(5, 30, 20.0), warmup=2),
    )
    matmul_n: int = 2048  # CPU: (2048 x 2048)^2 is ~0.2 s on 2 cores, a BLAS-saturating size
    matmul_n_cuda: int = 8192  # a (2048)^2 product is launch-bound on a GPU
    # 5. `snakemake -n all` on the demo config with every output present
    dag_repeats: Repeats = Repeats(3, 5, 30.0)

    def stated_repeats(self, item: str) -> dict:
        """The repeat counts `item` runs with (for the JSON and BENCHMARKS.md)."""
        if item == "mergear":
            return {"warmup": f"one decode per side on a {self.mergear_warmup_grid}^2 grid",
                    "timed": "one decode per side, in lockstep: L paired step times"}
        if item == "train":
            return {c.name: {"warmup_steps": c.warmup, **vars(c.repeats)} for c in self.train_cases}
        repeats = {"lfq": self.lfq_repeats, "tome": self.tome_repeats, "workflow": self.dag_repeats}[item]
        return {"warmup": 1, **(vars(repeats) if isinstance(repeats, Repeats) else {"min": repeats, "max": repeats})}


SCALES: dict[str, BenchScale] = {
    "full": BenchScale("full"),
    "tiny": BenchScale(
        "tiny", lfq_bits=10, lfq_images=2, lfq_tokens=16, lfq_dense_images_cpu=1, lfq_repeats=Repeats(2, 2, 0.0),
        tome_variants=("G+R-demo", "R-demo"), tome_batch_cpu=2, tome_batch_cuda=2, tome_repeats=Repeats(2, 2, 0.0),
        codes_tokenizer="G+R-demo", codes_tokenizer_cpu_overrides={},
        mergear_cpu=("mergear-demo", {"n_layer": 2, "dim": 64, "n_head": 4, "grid": 8}),
        mergear_cuda=("mergear-demo", {"n_layer": 2, "dim": 64, "n_head": 4, "grid": 8}),
        mergear_batch=2, mergear_warmup_grid=2,
        train_cases=(TrainCase("paper", "config/demo.yaml", "G+R", 2, repeats=Repeats(1, 1, 0.0), warmup=1),
                     TrainCase("demo", "config/demo.yaml", "G+R", 4, repeats=Repeats(1, 1, 0.0), warmup=1)),
        matmul_n=256, matmul_n_cuda=256, dag_repeats=Repeats(1, 1, 0.0),
        budget_s={"lfq": 30.0, "tome": 30.0, "mergear": 30.0, "train": 60.0, "workflow": 60.0}),
}
