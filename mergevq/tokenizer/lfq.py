"""Lookup-free quantisation (LFQ; MAGVIT-v2 / Open-MAGVIT2), the quantiser of Sec. 3.1.

The codebook is the set of sign vectors C = {-1, +1}^D, |C| = 2^D (D = ``bits``, 18 in the paper).
Nothing is looked up: a token z in R^D is quantised channel by channel to q = sign(z).

Conventions
-----------
* Sign: q_j = +1 where z_j > 0, else -1 (z_j == 0 maps to -1, as in Open-MAGVIT2; the paper's
  ``sign`` leaves 0 undefined in practice since it has probability zero).
* Index: channel j (0-based) is bit 2**j, least significant bit first:
  Index(q) = sum_j 2**j * [q_j > 0]. This is Open-MAGVIT2's order and the paper's Index formula
  (whose ``2^{k-1}`` is a typo for ``2^{j-1}`` with 1-based j); lucidrains' package uses the
  opposite (most significant bit first) order, so indices do not transfer between the two.

Entropy penalty (MAGVIT-v2)
---------------------------
Each token defines a distribution over the codebook with logits 2 z.c / T (T = 0.01):
p(c | z) = softmax_c(2 z.c / T). The loss is  mean_t H(p(.|z_t)) - H(mean_t p(.|z_t)):
confident per token, diverse over the batch. Open-MAGVIT2 materialises the (B*N, 2^D) logits
(2 GB in fp32 for 8 x 256 tokens at D = 18, and several copies in the backward pass); here:

* Per-sample entropy is exact without the dense tensor. p(c|z) ∝ prod_j exp(2 z_j c_j / T), so
  the bits are independent with p(c_j = +1 | z) = sigmoid(4 z_j / T) and the entropy is the sum of
  D binary entropies.
* Codebook entropy, exact (``codebook_entropy="exact"``, the default). Because a token's code
  distribution is a product over bits, splitting the bits into two halves a and b (D_a = D // 2,
  D_b = D - D_a) gives p(c_a, c_b | z_t) = A_t(c_a) B_t(c_b) with A_t, B_t the exact per-token
  distributions over the 2^D_a and 2^D_b half-codes. The batch mean over all 2^D codes is then one
  matrix product, P = A^T B / N ((2^D_a, 2^D_b); 512 x 512 at D = 18), and its entropy is the
  exact H(mean_t p(.|z_t)) Open-MAGVIT2 computes from the dense (N, 2^D) tensor. Memory is
  O(N * 2^(D/2) + 2^D) instead of O(N * 2^D): at D = 18 and 8 x 256 tokens, P holds 2^18 floats
  (1 MiB) where the dense logits hold 2^29 (2 GiB, several copies in the backward pass).
* Codebook entropy, sub-codebook bound (``codebook_entropy="subcodebook"``, lucidrains' choice;
  this package's default before the exact form). Sub-codebooks of ``group_bits`` bits (the last
  group takes the remainder): for each group the exact per-token distribution over its 2^g codes
  is averaged over the batch, and the entropies of these averaged group marginals are summed. By
  subadditivity of entropy this is an UPPER BOUND on the exact value, with equality when the
  groups are independent under the batch mean; it rewards each sub-codebook being used uniformly
  but cannot see correlations between groups. The gap grows when the batch has far fewer tokens
  than codes: the exact value is at most about log(tokens) + the per-sample entropy, the grouped
  one about n_groups * log(min(tokens, 2^g)) (256 random tokens at 18 bits: 5.6 exact vs 10.6
  grouped nats; 2048 tokens: 12.2 grouped). With ``group_bits >= bits`` there is one group and
  the value is exact (and the memory is dense again). Memory is O(tokens * 2^group_bits).
* Under torch.distributed the per-rank sums (P, or the group sums) and token counts are summed
  over ranks before the entropy, so the codebook entropy is that of the global batch.
* Quantisation and both entropies run in fp32 even under autocast: the 1/T = 100 logits overflow
  fp16 and the entropy of near-one-hot distributions loses all precision in bf16.
"""
from __future__ import annotations

import contextlib

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# Indices are int64, so a code can have at most 63 bits.
MAX_BITS = 63
CODEBOOK_ENTROPY_KINDS = ("exact", "subcodebook")
# The exact codebook entropy holds one float per code (2^24 floats = 64 MiB, per copy).
EXACT_ENTROPY_MAX_BITS = 24


class LFQOutput(NamedTuple):
    quantized: Tensor  # (B, N, D) in {-1, +1}, straight-through gradient to z, fp32
    indices: Tensor  # (B, N) int64, channel j at bit 2**j
    commitment_loss: Tensor  # scalar fp32, MSE(z, sg(q))
    entropy_loss: Tensor  # scalar fp32, per_sample_entropy - codebook_entropy
    per_sample_entropy: Tensor  # scalar fp32, mean over tokens (nats)
    codebook_entropy: Tensor  # scalar fp32, entropy of the (global) batch mean (nats)


class CodebookUsage(NamedTuple):
    usage: float  # fraction of the 2^bits codes that occur at least once
    perplexity: float  # exp(entropy of the empirical code histogram)
    used_codes: int  # number of distinct codes that occur


# --------------------------------------------------------------------------- quantisation


def sign_quantize(z: Tensor) -> Tensor:
    """Quantise to {-1, +1} with a straight-through (identity) gradient.

    z: (..., D) float. Returns (..., D) with the dtype of z: +1 where z > 0 else -1.
    Written as q + (z - sg(z)) rather than z + sg(q - z): same value and gradient, but the value is
    exactly +-1 (z + (q - z) can be off by one ulp after rounding).
    """
    q = torch.where(z > 0, torch.ones_like(z), -torch.ones_like(z))
    return q + (z - z.detach())


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"LFQ needs 1 <= bits <= {MAX_BITS} (int64 indices), got bits={bits}")


def codes_to_indices(codes: Tensor) -> Tensor:
    """Codes (..., D) in {-1, +1} (any sign-valued float) -> indices (...) int64.

    Channel j is bit 2**j (least significant bit first, Open-MAGVIT2 / the paper's Index).
    """
    bits = codes.shape[-1]
    _check_bits(bits)
    weights = torch.pow(2, torch.arange(bits, device=codes.device, dtype=torch.int64))  # (D,)
    return ((codes > 0).to(torch.int64) * weights).sum(dim=-1)


def indices_to_codes(indices: Tensor, bits: int) -> Tensor:
    """Indices (...) integer in [0, 2**bits) -> codes (..., bits) float32 in {-1, +1}.

    Inverse of `codes_to_indices`: channel j is +1 where bit 2**j of the index is set.
    """
    _check_bits(bits)
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    indices = indices.to(torch.int64)
    if indices.numel() and (indices.min() < 0 or indices.max() >= 2**bits):
        raise ValueError(
            f"indices out of range for a {bits}-bit codebook: min {int(indices.min())}, "
            f"max {int(indices.max())}, expected [0, {2**bits})"
        )
    return _unpack_bits(indices, bits)


def _unpack_bits(indices: Tensor, bits: int) -> Tensor:
    """int64 (...) -> (..., bits) float32 in {-1, +1}, no range check (no device sync)."""
    shifts = torch.arange(bits, device=indices.device, dtype=torch.int64)  # (D,)
    bit_set = (indices.unsqueeze(-1) >> shifts) & 1  # (..., D)
    return bit_set.to(torch.float32) * 2 - 1


# --------------------------------------------------------------------------- entropy


def _entropy(probs: Tensor) -> Tensor:
    """Entropy in nats of distributions over the last axis; 0 log 0 = 0 with a finite gradient."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(dim=-1)


def per_sample_entropy(z: Tensor, temperature: float = 0.01) -> Tensor:
    """Mean over tokens of H(p(. | z)), p(c | z) = softmax_c(2 z.c / T) over c in {-1, +1}^D.

    z: (..., D). Returns a scalar. Exact: the distribution factorises over bits with
    p(c_j = +1 | z) = sigmoid(a_j), a_j = 4 z_j / T. The binary entropy is even in a; with u = |a|,
    H = softplus(-u) + u * sigmoid(-u). Both terms are small for large u, so neither the value nor
    its gradient cancels catastrophically (softplus(a) - a * sigmoid(a) loses ~1e-5 absolute in the
    fp32 gradient at T = 0.01, a 15x larger error than this form).
    """
    u = (4.0 * z / temperature).abs()  # (..., D)
    bit_entropy = F.softplus(-u) + u * torch.sigmoid(-u)  # (..., D)
    return bit_entropy.sum(dim=-1).mean()


def bit_groups(bits: int, group_bits: int) -> list[tuple[int, int]]:
    """Split channels [0, bits) into consecutive (start, size) groups of group_bits; last smaller."""
    _check_bits(bits)
    if group_bits < 1:
        raise ValueError(f"group_bits must be >= 1, got {group_bits}")
    return [(start, min(group_bits, bits - start)) for start in range(0, bits, group_bits)]


def group_code_probabilities(z_group: Tensor, temperature: float = 0.01) -> Tensor:
    """Exact per-token distribution over one group's 2^g codes.

    z_group: (T, g) -> (T, 2^g); column k is the code `indices_to_codes(k, g)` (LSB first).
    It is softmax(2 z_g.c_g / T), the group marginal of p(. | z) since bits are independent.
    """
    g = z_group.shape[-1]
    codes = _unpack_bits(torch.arange(2**g, device=z_group.device), g)  # (2^g, g)
    logits = 2.0 * z_group @ codes.to(z_group.dtype).T / temperature  # (T, 2^g)
    return logits.softmax(dim=-1)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward sums the incoming gradients over ranks as well.

    Every rank computes the same global loss from the summed tensor, so rank r's local inputs get
    world_size * d(global loss)/d(local inputs); DDP's gradient averaging divides by world_size,
    giving exactly the gradient of the global-batch loss (the same scaling a per-rank mean has).
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def distributed_active() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sum_over_ranks(sums: list[Tensor], num_tokens: int, like: Tensor, sync: bool, group) -> tuple[list[Tensor], Tensor]:
    """Per-rank sums (any shapes) and the token count -> their totals over ranks (one collective)."""
    count = torch.tensor([float(num_tokens)], device=like.device, dtype=like.dtype)
    flat = torch.cat([t.reshape(-1) for t in sums] + [count])
    if sync and distributed_active():
        flat = _AllReduceSum.apply(flat, group)
    elif num_tokens == 0:
        raise ValueError("codebook_entropy got no tokens")
    parts = flat[:-1].split([t.numel() for t in sums])
    return [p.view_as(t) for p, t in zip(parts, sums)], flat[-1]


def exact_codebook_entropy(z: Tensor, temperature: float = 0.01, sync: bool = True, group=None) -> Tensor:
    """Exact entropy of the batch-mean code distribution over all 2^D codes, without the dense tensor.

    z: (..., D); all leading axes are tokens. Returns a scalar (nats). With the bits split into
    halves a = channels [0, D_a), b = [D_a, D) (D_a = D // 2), every token's distribution is the
    outer product of its half-code distributions A_t (2^D_a,) and B_t (2^D_b,), so
        sum_t p(c_a, c_b | z_t) = (A^T B)[c_a, c_b],   A (N, 2^D_a), B (N, 2^D_b),
    and the batch mean is that matrix over N. sync: under torch.distributed the (2^D_a, 2^D_b)
    sum and N are all-reduced (differentiably), so the value is that of the global batch; every
    rank must then call this, and backpropagate through it, in the same order.
    """
    bits = z.shape[-1]
    _check_bits(bits)
    if bits > EXACT_ENTROPY_MAX_BITS:
        raise ValueError(f"the exact codebook entropy holds a 2^{bits} table; above "
                         f"{EXACT_ENTROPY_MAX_BITS} bits use codebook_entropy='subcodebook' "
                         f"(config tokenizer.loss.codebook_entropy)")
    z_tokens = z.reshape(-1, bits)  # (N, D)
    half = bits // 2
    a = group_code_probabilities(z_tokens[:, :half], temperature)  # (N, 2^D_a)
    b = group_code_probabilities(z_tokens[:, half:], temperature)  # (N, 2^D_b)
    (joint,), total = _sum_over_ranks([a.T @ b], z_tokens.shape[0], z, sync, group)  # (2^D_a, 2^D_b)
    return _entropy((joint / total).reshape(-1))


def subcodebook_entropy(z: Tensor, temperature: float = 0.01, group_bits: int = 9, sync: bool = True,
                        group=None) -> Tensor:
    """Sum over sub-codebooks of group_bits bits of the entropy of each one's batch-mean distribution.

    z: (..., D); all leading axes are tokens. Returns a scalar (nats): an upper bound on
    `exact_codebook_entropy`, equal to it when group_bits >= D (see the module docstring).
    sync: as in `exact_codebook_entropy` (group sums and token counts are summed over ranks).
    """
    bits = z.shape[-1]
    groups = bit_groups(bits, group_bits)
    z_tokens = z.reshape(-1, bits)  # (N, D)
    # Sum (not mean) per rank, so ranks with different token counts are weighted correctly.
    sums = [
        group_code_probabilities(z_tokens[:, start : start + size], temperature).sum(dim=0)
        for start, size in groups
    ]  # each (2^g,)
    sums, total = _sum_over_ranks(sums, z_tokens.shape[0], z, sync, group)
    return torch.stack([_entropy(s / total) for s in sums]).sum()


def codebook_entropy(z: Tensor, temperature: float = 0.01, kind: str = "exact", group_bits: int = 9,
                     sync: bool = True, group=None) -> Tensor:
    """Entropy of the batch-mean code distribution: `kind` "exact" (default) or "subcodebook" (the
    upper bound over sub-codebooks of `group_bits` bits). z: (..., D) -> scalar (nats)."""
    if kind == "exact":
        return exact_codebook_entropy(z, temperature, sync, group)
    if kind == "subcodebook":
        return subcodebook_entropy(z, temperature, group_bits, sync, group)
    raise ValueError(f"codebook entropy kind {kind!r} is not one of {CODEBOOK_ENTROPY_KINDS}")


# --------------------------------------------------------------------------- module


class LFQ(nn.Module):
    """Lookup-free quantiser with commitment and entropy losses (no parameters).

    bits: code dimension D (codebook 2^D). entropy_temperature: T of the 2 z.c / T logits.
    codebook_entropy: "exact" (default) or "subcodebook" (the upper bound, see the module docstring).
    group_bits: sub-codebook size of the "subcodebook" kind (exact if >= bits; unused by "exact").
    sync_entropy: all-reduce the codebook entropy over ranks; None (default) = only in training
    mode, so evaluation run on a single rank never waits on a collective.
    """

    def __init__(
        self,
        bits: int,
        entropy_temperature: float = 0.01,
        group_bits: int = 9,
        sync_entropy: bool | None = None,
        codebook_entropy: str = "exact",
    ):
        super().__init__()
        _check_bits(bits)
        if entropy_temperature <= 0:
            raise ValueError(f"entropy_temperature must be > 0, got {entropy_temperature}")
        if codebook_entropy not in CODEBOOK_ENTROPY_KINDS:
            raise ValueError(f"codebook_entropy {codebook_entropy!r} is not one of {CODEBOOK_ENTROPY_KINDS}")
        if codebook_entropy == "exact" and bits > EXACT_ENTROPY_MAX_BITS:
            raise ValueError(f"the exact codebook entropy holds a 2^{bits} table; above "
                             f"{EXACT_ENTROPY_MAX_BITS} bits use codebook_entropy='subcodebook'")
        bit_groups(bits, group_bits)  # validates group_bits
        self.bits = bits
        self.entropy_temperature = float(entropy_temperature)
        self.group_bits = group_bits
        self.sync_entropy = sync_entropy
        self.codebook_entropy = codebook_entropy

    @property
    def codebook_size(self) -> int:
        return 2**self.bits

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, entropy_temperature={self.entropy_temperature}, "
            f"codebook_entropy={self.codebook_entropy}, group_bits={self.group_bits}, "
            f"sync_entropy={self.sync_entropy}"
        )

    def forward(self, z: Tensor) -> LFQOutput:
        """z: (B, N, D=bits) (any leading shape works) -> LFQOutput, everything fp32."""
        if z.shape[-1] != self.bits:
            raise ValueError(f"LFQ with bits={self.bits} got z with last dimension {z.shape[-1]}")
        sync = self.training if self.sync_entropy is None else self.sync_entropy
        # autocast has no meta backend; a meta tensor (shape checks of the paper presets) needs none
        no_autocast = (contextlib.nullcontext() if z.device.type == "meta"
                       else torch.autocast(device_type=z.device.type, enabled=False))
        with no_autocast:
            z = z.float()
            quantized = sign_quantize(z)  # Eq. (4)
            indices = codes_to_indices(quantized.detach())
            # Reaches the encoder through z only: the codes themselves have no parameters.
            commitment = F.mse_loss(z, quantized.detach())
            sample_h = per_sample_entropy(z, self.entropy_temperature)
            codebook_h = codebook_entropy(z, self.entropy_temperature, self.codebook_entropy,
                                          self.group_bits, sync=sync)
        return LFQOutput(
            quantized=quantized,
            indices=indices,
            commitment_loss=commitment,
            entropy_loss=sample_h - codebook_h,
            per_sample_entropy=sample_h,
            codebook_entropy=codebook_h,
        )


# --------------------------------------------------------------------------- usage


def codebook_usage(indices: Tensor, bits: int) -> CodebookUsage:
    """Usage statistics of code indices (any shape, integer) from a 2^bits codebook.

    Counts distinct codes with torch.unique, so memory scales with the number of indices, not with
    2^bits (a histogram over 2^18 codes would be fine, over 2^40 not).
    """
    _check_bits(bits)
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    flat = indices.reshape(-1).to(torch.int64)
    if flat.numel() == 0:
        raise ValueError("codebook_usage got an empty index tensor")
    if flat.min() < 0 or flat.max() >= 2**bits:
        raise ValueError(
            f"indices out of range for a {bits}-bit codebook: min {int(flat.min())}, "
            f"max {int(flat.max())}"
        )
    _, counts = torch.unique(flat, return_counts=True)
    probs = counts.to(torch.float64) / flat.numel()
    entropy = float(-(probs * probs.log()).sum())
    used = int(counts.numel())
    return CodebookUsage(usage=used / 2**bits, perplexity=math.exp(entropy), used_codes=used)
