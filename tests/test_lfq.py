"""LFQ invariants: index/code round trips, straight-through sign, factorised vs dense entropy
(per-sample, exact codebook, sub-codebook bound), fp32 under autocast, and the codebook entropy of
the global batch under torch.distributed."""
from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import pytest
import torch

from mergevq.tokenizer.lfq import (
    LFQ,
    codebook_entropy,
    codebook_usage,
    codes_to_indices,
    exact_codebook_entropy,
    indices_to_codes,
    per_sample_entropy,
    subcodebook_entropy,
)


def _all_codes(bits: int) -> torch.Tensor:
    return indices_to_codes(torch.arange(2**bits), bits).double()  # (2^bits, bits)


def _dense_logits(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """The Open-MAGVIT2 way: all (T, 2^bits) logits 2 z.c / T, in float64."""
    bits = z.shape[-1]
    return 2.0 * z.double().reshape(-1, bits) @ _all_codes(bits).T / temperature


def _dense_per_sample_entropy(z, temperature):
    logits = _dense_logits(z, temperature)
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


def _dense_codebook_entropy(z, temperature):
    mean_probs = _dense_logits(z, temperature).softmax(-1).mean(0)
    return -(mean_probs * mean_probs.clamp_min(1e-300).log()).sum()


# ---------------------------------------------------------------- index <-> code


def test_index_code_round_trip():
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 2**18, (4, 64), generator=g)
    codes = indices_to_codes(indices, 18)
    assert codes.shape == (4, 64, 18) and set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(codes_to_indices(codes), indices)

    codes = torch.randint(0, 2, (3, 5, 18), generator=g).float() * 2 - 1
    assert torch.equal(indices_to_codes(codes_to_indices(codes), 18), codes)

    # Channel j is bit 2**j (least significant bit first).
    assert indices_to_codes(torch.tensor([1, 6]), 4).tolist() == [[1, -1, -1, -1], [-1, 1, 1, -1]]
    with pytest.raises(ValueError, match="out of range"):
        indices_to_codes(torch.tensor([16]), 4)


def test_quantized_values_and_straight_through_gradient():
    z = torch.randn(2, 7, 10, requires_grad=True)
    out = LFQ(bits=10)(z)
    assert out.quantized.dtype == torch.float32 and out.indices.dtype == torch.int64
    assert out.indices.shape == (2, 7)
    assert torch.equal(out.quantized, torch.where(z > 0, 1.0, -1.0))
    assert torch.equal(out.indices, codes_to_indices(z))
    upstream = torch.randn_like(z)
    (grad,) = torch.autograd.grad(out.quantized, z, upstream)
    assert torch.equal(grad, upstream)
    # Commitment reaches z only (its target is detached).
    (grad_c,) = torch.autograd.grad(out.commitment_loss, z)
    assert torch.allclose(grad_c, 2 * (z - out.quantized.detach()) / z.numel())
    with pytest.raises(ValueError, match="last dimension"):
        LFQ(bits=9)(z)


# ---------------------------------------------------------------- entropy


@pytest.mark.parametrize("scale", [0.002, 0.01, 0.05])
def test_factorised_per_sample_entropy_equals_dense(scale):
    z = (torch.randn(2, 16, 10, generator=torch.Generator().manual_seed(1)) * scale).requires_grad_()
    ours = per_sample_entropy(z, 0.01)
    dense = _dense_per_sample_entropy(z, 0.01)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - dense.item()) < 1e-5, (ours.item(), dense.item())
    (g_ours,) = torch.autograd.grad(ours, z)
    (g_dense,) = torch.autograd.grad(dense, z)
    assert torch.allclose(g_ours, g_dense, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", [1, 2, 7, 10, 12])
@pytest.mark.parametrize("scale", [0.002, 0.01, 0.05])
def test_exact_codebook_entropy_equals_dense(bits, scale):
    # Odd and even bit counts (unequal halves), near-uniform to near-one-hot token distributions.
    z = (torch.randn(3, 20, bits, generator=torch.Generator().manual_seed(2)) * scale).requires_grad_()
    ours = exact_codebook_entropy(z, 0.01)
    dense = _dense_codebook_entropy(z, 0.01)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - dense.item()) < 1e-5, (ours.item(), dense.item())
    (g_ours,) = torch.autograd.grad(ours, z)
    (g_dense,) = torch.autograd.grad(dense, z)
    assert torch.allclose(g_ours, g_dense, atol=1e-5, rtol=1e-4), (g_ours - g_dense).abs().max()
    # float64 input: the same function to rounding, so the factorisation itself is exact
    z64 = z.detach().double().requires_grad_()
    ours64 = exact_codebook_entropy(z64, 0.01)
    (g64,) = torch.autograd.grad(ours64, z64)
    (g64_dense,) = torch.autograd.grad(_dense_codebook_entropy(z64, 0.01), z64)
    assert abs(ours64.item() - dense.item()) < 1e-10
    assert torch.allclose(g64, g64_dense, atol=1e-10, rtol=1e-8)
    assert codebook_entropy(z, 0.01).item() == ours.item()  # the default kind


@pytest.mark.parametrize("group_bits", [10, 12])
def test_subcodebook_entropy_exact_with_one_group(group_bits):
    z = (torch.randn(3, 20, 10, generator=torch.Generator().manual_seed(2)) * 0.01).requires_grad_()
    ours = subcodebook_entropy(z, 0.01, group_bits=group_bits)
    dense = _dense_codebook_entropy(z, 0.01)
    assert abs(ours.item() - dense.item()) < 1e-5, (ours.item(), dense.item())
    (g_ours,) = torch.autograd.grad(ours, z)
    (g_dense,) = torch.autograd.grad(dense, z)
    assert torch.allclose(g_ours, g_dense, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("group_bits", [1, 3, 4, 9])
@pytest.mark.parametrize("scale", [0.003, 0.02])
def test_subcodebook_entropy_upper_bounds_exact(group_bits, scale):
    z = torch.randn(3, 20, 10, generator=torch.Generator().manual_seed(3)) * scale
    # Correlated channels make the groups dependent under the batch mean: the bound is strict.
    z[..., 5:] = z[..., :5]
    grouped = codebook_entropy(z, 0.01, "subcodebook", group_bits=group_bits).item()
    dense = _dense_codebook_entropy(z, 0.01).item()
    assert abs(exact_codebook_entropy(z, 0.01).item() - dense) < 1e-5
    assert grouped >= dense - 1e-6 and grouped <= 10 * math.log(2) + 1e-5
    if group_bits <= 5:
        assert grouped > dense + 1e-3
    # One token: its distribution factorises over bits, so every grouping is exact.
    single = subcodebook_entropy(z[:1, :1], 0.01, group_bits=group_bits).item()
    assert abs(single - _dense_codebook_entropy(z[:1, :1], 0.01).item()) < 1e-5


def test_codebook_entropy_kind_and_size_errors():
    z = torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match="subcodebook"):
        codebook_entropy(z, 0.01, "bound")
    with pytest.raises(ValueError, match="codebook_entropy"):
        LFQ(bits=10, codebook_entropy="dense")
    with pytest.raises(ValueError, match="subcodebook"):
        LFQ(bits=30)  # the exact table would hold 2^30 floats
    assert LFQ(bits=30, codebook_entropy="subcodebook").codebook_entropy == "subcodebook"


def test_autocast_bfloat16_outputs_fp32_and_finite():
    torch.manual_seed(4)
    proj = torch.nn.Linear(32, 18)
    x = torch.randn(2, 16, 32)
    lfq = LFQ(bits=18)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = proj(x)
        assert z.dtype == torch.bfloat16
        out = lfq(z)
    for name in ("quantized", "commitment_loss", "entropy_loss", "per_sample_entropy", "codebook_entropy"):
        value = getattr(out, name)
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), name
    reference = lfq(z.float())
    assert torch.equal(out.entropy_loss, reference.entropy_loss)
    out.entropy_loss.backward()
    assert torch.isfinite(proj.weight.grad).all()


def test_codebook_usage():
    usage = codebook_usage(torch.tensor([[0, 0], [1, 3]]), bits=2)
    assert usage.used_codes == 3 and usage.usage == 0.75
    assert math.isclose(usage.perplexity, math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))))
    assert codebook_usage(torch.tensor([5, 2**18 - 1]), bits=18).used_codes == 2
    with pytest.raises(ValueError, match="out of range"):
        codebook_usage(torch.tensor([4]), bits=2)


# ---------------------------------------------------------------- torch.distributed

# Unequal shares (3 + 1 samples) also check that ranks are weighted by their token counts.
_SPLIT = (3, 1)
_BITS, _GROUP_BITS, _TEMPERATURE = 10, 4, 0.01


def _gloo_worker(rank: int, world_size: int, port: int, out_dir: str, z_full: torch.Tensor, kind: str):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        start = sum(_SPLIT[:rank])
        z = z_full[start : start + _SPLIT[rank]]
        lfq = LFQ(bits=_BITS, entropy_temperature=_TEMPERATURE, group_bits=_GROUP_BITS,
                  codebook_entropy=kind).train()
        entropy = lfq(z).codebook_entropy  # the module path, fp32
        # Gradients in float64: at T = 0.01 the fp32 softmax backward alone differs by ~4e-6
        # between summation orders, which would hide the scaling checked here.
        z64 = z.double().requires_grad_()
        codebook_entropy(z64, _TEMPERATURE, kind, group_bits=_GROUP_BITS).backward()
        torch.save({"entropy": entropy, "grad": z64.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["exact", "subcodebook"])
def test_codebook_entropy_is_global_under_gloo(tmp_path, kind):
    world_size = len(_SPLIT)
    z_full = torch.randn(sum(_SPLIT), 8, _BITS, generator=torch.Generator().manual_seed(5)) * 0.01
    torch.multiprocessing.spawn(
        _gloo_worker, args=(world_size, _free_port(), str(tmp_path), z_full, kind), nprocs=world_size
    )
    # one process on the concatenated batch
    entropy = codebook_entropy(z_full, _TEMPERATURE, kind, group_bits=_GROUP_BITS)
    if kind == "exact":
        assert abs(entropy.item() - _dense_codebook_entropy(z_full, _TEMPERATURE).item()) < 1e-5
    z64 = z_full.double().requires_grad_()
    (grad,) = torch.autograd.grad(codebook_entropy(z64, _TEMPERATURE, kind, group_bits=_GROUP_BITS), z64)
    for rank in range(world_size):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert abs(result["entropy"].item() - entropy.item()) < 1e-6
        # Each rank gets world_size x the global gradient of its own inputs: every rank holds the
        # same global loss and the all-reduce backward sums their gradients. DDP's averaging over
        # ranks divides by world_size, so the parameter update is exactly the global-batch one.
        start = sum(_SPLIT[:rank])
        expected = world_size * grad[start : start + _SPLIT[rank]]
        assert torch.allclose(result["grad"], expected, rtol=1e-9, atol=1e-12)
