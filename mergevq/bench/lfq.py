"""Item 1: the LFQ entropy loss at 2^18 codes, ours against the dense formulation.

Both sides compute the whole MAGVIT-v2 entropy loss, per-sample entropy minus codebook entropy, on
z of shape (images, tokens, bits) at T = 0.01, forward and backward to z:

  ours   `mergevq.tokenizer.lfq`: the per-sample entropy factorised over bits and the exact
         codebook entropy (the (2^(D/2) x 2^(D/2)) batch-mean table, one matmul);
  dense  Open-MAGVIT2's compute_entropy_loss: all (B*N, 2^D) logits 2 z.c, softmax and
         log-softmax over the codes, the per-sample entropy of each row and the entropy of the
         batch mean. Written here as the reference, with exact entropies (0 log 0 = 0): Open-MAGVIT2
         adds 1e-5 inside log(mean + 1e-5), which biases its codebook entropy by about
         1e-5 x (codes in use), ~1e-3 nats at 256 tokens, so it is left out of the comparison.

z = 0.01 * N(0, 1): logits 2 z.c / T of order 10, so both entropies are far from their extremes
(near one-hot distributions, z ~ N(0, 1), would make the comparison trivial).
On CPU the dense side runs `lfq_dense_images_cpu` images and its time and memory are scaled
linearly to the full batch (every (tokens, 2^18) tensor grows with the token count).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mergevq.bench.memory import peak_memory
from mergevq.bench.report import Goal, ItemResult
from mergevq.bench.scale import BenchScale
from mergevq.bench.timing import alternate, profile_top
from mergevq.tokenizer.lfq import exact_codebook_entropy, indices_to_codes, per_sample_entropy

TEMPERATURE = 0.01
Z_SCALE = 0.01


def dense_entropies(z: torch.Tensor, temperature: float = TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """Open-MAGVIT2's dense computation. z (..., D) -> (per-sample entropy, codebook entropy), nats."""
    bits = z.shape[-1]
    codebook = indices_to_codes(torch.arange(2**bits, device=z.device), bits)  # (2^D, D)
    logits = 2 * z.reshape(-1, bits) @ codebook.T  # (N, 2^D)
    probs = F.softmax(logits / temperature, dim=-1)
    log_probs = F.log_softmax(logits / temperature, dim=-1)
    per_sample = (-(probs * log_probs).sum(-1)).mean()
    avg = probs.mean(0)  # (2^D,)
    codebook_h = -(avg * avg.clamp_min(torch.finfo(avg.dtype).tiny).log()).sum()
    return per_sample, codebook_h


def ours_entropies(z: torch.Tensor, temperature: float = TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """mergevq's factorised per-sample and exact codebook entropies. z (..., D) -> two scalars."""
    return per_sample_entropy(z, temperature), exact_codebook_entropy(z, temperature, sync=False)


ENTROPIES = {"ours": ours_entropies, "dense": dense_entropies}


@torch.no_grad()
def dense_reference(z: torch.Tensor, temperature: float = TEMPERATURE, chunk: int = 32) -> tuple[float, float]:
    """The dense formulation's two entropies in float64, `chunk` tokens at a time (no gradient):
    the reference both fp32 sides are compared with. z (..., D) -> (per-sample, codebook) nats."""
    bits = z.shape[-1]
    codebook = indices_to_codes(torch.arange(2**bits, device=z.device), bits).double()  # (2^D, D)
    tokens = z.detach().reshape(-1, bits).double()  # (N, D)
    sample_h = torch.zeros((), dtype=torch.float64, device=z.device)
    mean = torch.zeros(2**bits, dtype=torch.float64, device=z.device)
    for rows in tokens.split(chunk):
        log_p = F.log_softmax(2 * rows @ codebook.T / temperature, dim=-1)  # (chunk, 2^D)
        p = log_p.exp()
        sample_h -= (p * log_p).sum()
        mean += p.sum(0)
    mean /= tokens.shape[0]
    codebook_h = -(mean * mean.clamp_min(torch.finfo(mean.dtype).tiny).log()).sum()
    return float(sample_h / tokens.shape[0]), float(codebook_h)


def make_z(images: int, tokens: int, bits: int, device, seed: int = 0) -> torch.Tensor:
    """The benchmark's z (images, tokens, bits), fp32, requires grad; the first n images of a call
    with more images are the same as a call with n."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.cat([Z_SCALE * torch.randn(1, tokens, bits, generator=gen) for _ in range(images)])
    return z.to(device).requires_grad_()


def side(kind: str, images: int, tokens: int, bits: int, device="cpu", seed: int = 0):
    """A zero-argument callable: the entropy loss of `kind` forward + backward on make_z(...);
    returns the two entropies (detached). Also the builder of `mergevq.bench.memory`."""
    entropies = ENTROPIES[kind]
    z = make_z(images, tokens, bits, device, seed)

    def run():
        z.grad = None
        sample_h, codebook_h = entropies(z)
        (sample_h - codebook_h).backward()
        return sample_h.detach(), codebook_h.detach()

    return run


def run(scale: BenchScale, device: torch.device) -> ItemResult:
    images, tokens, bits = scale.lfq_images, scale.lfq_tokens, scale.lfq_bits
    dense_images = min(images, scale.lfq_dense_images_cpu) if device.type == "cpu" else images
    factor = images / dense_images  # the dense side's time and memory are linear in the tokens
    ours = side("ours", images, tokens, bits, device)
    dense = side("dense", dense_images, tokens, bits, device)
    last: dict[str, tuple] = {}  # each side's entropies from its last timed call
    times = alternate({name: (lambda f=f, name=name: last.__setitem__(name, f())) for name, f in
                       (("ours", ours), ("dense", dense))}, scale.lfq_repeats, device)
    per_round = [d * factor / o for o, d in zip(times["ours"].samples, times["dense"].samples)]
    speed = times["dense"].median * factor / times["ours"].median

    # each fp32 side against the dense formulation in float64: ours on the whole batch, the fp32
    # dense side on its images (fp32 sums over 2^18 codes are themselves off by ~1e-4 nats)
    reference = dense_reference(make_z(images, tokens, bits, device))
    ours_out = [float(v) for v in last["ours"]]
    diffs = [abs(a - b) for a, b in zip(ours_out, reference)]
    reference_small = dense_reference(make_z(dense_images, tokens, bits, device))
    dense_out = [float(v) for v in last["dense"]]

    dev = str(device)
    toy = dict(images=1, tokens=8, bits=bits)  # each process first runs a toy call (library set-up)
    mem_ours = peak_memory("mergevq.bench.lfq:side", dict(kind="ours", images=images, tokens=tokens, bits=bits),
                           dev, warmup_kwargs=dict(kind="ours", **toy))
    mem_dense = peak_memory("mergevq.bench.lfq:side", dict(kind="dense", images=dense_images, tokens=tokens,
                                                           bits=bits), dev, warmup_kwargs=dict(kind="dense", **toy))
    memory = mem_dense["peak_bytes"] * factor / max(mem_ours["peak_bytes"], 1)

    keys = {"lfq_memory_ratio": memory, "lfq_speed_ratio": speed, "lfq_entropy_abs_diff": max(diffs)}
    goals = [Goal("lfq_memory_ratio", memory, ">=", 200.0, "dense peak memory / ours"),
             Goal("lfq_speed_ratio", speed, ">=", 50.0, "dense time / ours, forward + backward"),
             Goal("lfq_entropy_abs_diff", max(diffs), "<=", 1e-4,
                  "max |ours - dense (float64)| of the two entropies, nats")]
    details = {
        "shape": [images, tokens, bits], "codes": 2**bits, "temperature": TEMPERATURE, "z_scale": Z_SCALE,
        "dense_images": dense_images, "dense_scaled_by": factor,
        "time": {k: t.as_dict() for k, t in times.items()},
        "speed_ratio_per_round": {"min": min(per_round), "max": max(per_round)},
        "memory": {"ours": mem_ours, "dense": mem_dense,
                   "dense_scaled_bytes": mem_dense["peak_bytes"] * factor,
                   "ratio_is_lower_bound": not mem_ours["resolved"]},
        "entropies": {name: {"ours": o, "dense_float64": r, "abs_diff": d}
                      for name, o, r, d in zip(("per_sample", "codebook"), ours_out, reference, diffs)},
        "dense_fp32_abs_diff_on_its_images": {name: abs(a - b) for name, a, b in
                                              zip(("per_sample", "codebook"), dense_out, reference_small)},
    }
    result = ItemResult(keys, details, goals)
    if not all(g.met for g in goals[:2]):
        result.profile = {"ours": profile_top(ours, device), "dense": profile_top(dense, device)}
    return result
