"""Token merging (ToMe, Bolya et al. 2023) as used by MergeVQ's encoder.

Pure tensor functions first (matching + weighted merge, proportional attention, Eq. 18), then the
timm-style ViT block that wires them together, then the per-layer merge schedules (App. A.1).

Shapes: B batch, N tokens entering a layer, L tokens before any merging, C channels,
h heads, d head dim.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath


class MergeResult(NamedTuple):
    x: torch.Tensor       # (B, N - r, C) merged features
    size: torch.Tensor    # (B, N - r, 1) number of original tokens each output token covers
    source: torch.Tensor  # (B, N - r, L) binary: row k marks the original positions merged into token k


# ---------------------------------------------------------------------------------------------
# Bipartite soft matching


def merge_tokens(x: torch.Tensor, metric: torch.Tensor, r: int,
                 size: torch.Tensor | None = None, source: torch.Tensor | None = None) -> MergeResult:
    """Merge r tokens per sample by ToMe's bipartite soft matching.

    x (B, N, C) features; metric (B, N, D) matching features (attention keys averaged over heads);
    size (B, N, 1) token sizes, None = ones; source (B, N, L) binary, None = identity (L = N).
    r is capped at N // 2; r <= 0 returns the inputs (with defaults filled in).

    Set A = even positions, set B = odd positions. Every A token finds its most cosine-similar B
    token; the r A tokens with the highest best-match similarity are merged into their B partners
    (several A tokens may merge into one B token). Features are size-weighted means, sizes add up,
    source rows are combined by element-wise max so they stay binary.

    Output order (per sample): the N_A - r unmerged A tokens in their original relative order, then
    all N_B B tokens in original order (merged ones updated in place). Matches are chosen per
    sample, so different samples merge different tokens. Gradients flow to x (not through the
    matching, which ToMe also computes without gradient).

    Returns MergeResult(x (B, N-r, C), size (B, N-r, 1) float32 by default, source (B, N-r, L)).
    """
    B, N, C = x.shape
    if size is None:
        size = x.new_ones(B, N, 1, dtype=torch.float32)
    if source is None:
        source = torch.eye(N, device=x.device, dtype=torch.float32).expand(B, N, N)
    if size.shape != (B, N, 1) or source.shape[:2] != (B, N):
        raise ValueError(f"merge_tokens: size {tuple(size.shape)} / source {tuple(source.shape)} "
                         f"do not describe the {N} tokens of x {tuple(x.shape)}")
    r = min(int(r), N // 2)
    if r <= 0:
        return MergeResult(x, size, source)

    with torch.no_grad():
        metric = F.normalize(metric.float(), dim=-1)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, N_A, N_B) cosine
        best_score, best_dst = scores.max(dim=-1)  # (B, N_A)
        order = best_score.sort(dim=-1, descending=True, stable=True).indices  # (B, N_A)
        src_idx = order[:, :r]  # (B, r) A tokens that merge
        unm_idx = order[:, r:].sort(dim=-1).values  # (B, N_A - r) kept A tokens, original order
        dst_idx = best_dst.gather(1, src_idx)  # (B, r) their B partners

    def merge(t: torch.Tensor, reduce: str) -> torch.Tensor:
        a, b = t[:, ::2], t[:, 1::2]  # (B, N_A, c), (B, N_B, c)
        c = t.shape[-1]
        unm = a.gather(1, unm_idx[..., None].expand(-1, -1, c))
        src = a.gather(1, src_idx[..., None].expand(-1, -1, c))
        b = b.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, c), src, reduce=reduce)
        return torch.cat([unm, b], dim=1)  # (B, N - r, c)

    weighted = merge(x * size, "sum")
    new_size = merge(size, "sum")
    new_x = (weighted / new_size).to(x.dtype)
    return MergeResult(new_x, new_size, merge(source, "amax"))


# ---------------------------------------------------------------------------------------------
# Proportional attention


def proportional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           size: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention with ToMe's size correction.

    q, k, v (B, h, N, d); size (B, N, 1) or None (plain attention). Returns (B, h, N, d).
    A token of size s acts like s identical keys, so log(s) is added on the key axis.
    """
    mask = None
    if size is not None:
        mask = size[:, None, None, :, 0].log().to(q.dtype)  # (B, 1, 1, N)  Eq. (18)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------------
# timm-style ViT block with merging (parameter names follow timm's Block for checkpoint loading)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """timm Attention with proportional attention; also returns the merge metric (keys, head mean)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d)
        out = proportional_attention(q, k, v, size).transpose(1, 2).reshape(B, N, C)
        return self.proj(out), k.mean(dim=1)  # (B, N, C), metric (B, N, d)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ToMeBlock(nn.Module):
    """Pre-norm ViT block (timm Block) with token merging between attention and MLP.

    Modifications relative to timm's Block:
     - attention is proportional (Eq. 18) when token sizes are given;
     - after the attention residual, r non-prefix tokens are merged (keys averaged over heads as
       the metric), then the MLP runs on the shorter sequence.
    Prefix tokens (cls) are never merged and keep their position at the front; size and source
    describe only the N - num_prefix_tokens other tokens (prefix tokens count as size 1).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 layer_scale_init: float | None = 1e-5, norm_layer=nn.LayerNorm,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, r: int, size: torch.Tensor | None = None,
                source: torch.Tensor | None = None, num_prefix_tokens: int = 0) -> MergeResult:
        """x (B, N, C) with num_prefix_tokens prefix tokens first; size (B, N-p, 1); source
        (B, N-p, L). Returns MergeResult(x (B, N - r', C), size (B, N-p-r', 1), source), r' = the
        capped r. r = 0 runs without merging (attention is still proportional to size)."""
        B, N, _ = x.shape
        p = num_prefix_tokens
        attn_size = None
        if size is not None:
            attn_size = torch.cat([size.new_ones(B, p, 1), size], dim=1)  # (B, N, 1)
        out, metric = self.attn(self.norm1(x), attn_size)
        x = x + self.drop_path(self.ls1(out))
        merged = merge_tokens(x[:, p:], metric[:, p:], r, size, source)
        x = torch.cat([x[:, :p], merged.x], dim=1)
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return MergeResult(x, merged.size, merged.source)


# ---------------------------------------------------------------------------------------------
# Merge schedules: how many tokens each layer merges so that num_tokens -> kept exactly

SCHEDULE_KINDS = ("tome", "constant", "linear", "square")


def tome_parse_r(depth: int, r: int, inflect: float = -0.5) -> list[int]:
    """ToMe's parse_r for an (r, inflect) pair: linear from int(r(1-inflect)) to 2r minus that.

    With the authors' inflect = -0.5 this decreases from about 1.5 r to 0.5 r.
    """
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    if depth == 1:
        return [int(r)]
    step = (max_val - min_val) / (depth - 1)
    return [int(min_val + step * i) for i in range(depth)]


def _largest_remainder(weights: list[float], total: int) -> list[int]:
    """Integers proportional to weights summing exactly to total; ties go to earlier layers."""
    norm = sum(weights)
    exact = [total * w / norm for w in weights]
    out = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return out


def _tome_schedule(num_merge: int, depth: int) -> list[int]:
    # The authors' search: the integer r whose parse_r schedule sums closest to the wanted merge
    # count (ties -> smaller r), the remainder (possibly negative) added to layer 0.
    best = min(range(num_merge + 1), key=lambda r: (abs(sum(tome_parse_r(depth, r)) - num_merge), r))
    schedule = tome_parse_r(depth, best)
    schedule[0] += num_merge - sum(schedule)
    return schedule


def _repair(schedule: list[int], num_tokens: int, kept: int) -> list[int]:
    """Closest feasible schedule: every r_i >= 0, r_i <= n_i // 2, sum == num_tokens - kept.

    1. Negative entries (a negative remainder on layer 0) become 0; the surplus this creates is
       taken from the last layers first, which keeps a decreasing schedule decreasing.
    2. On token counts n_i (n_0 = N, n_{i+1} = n_i - r_i) the cap reads n_{i+1} >= ceil(n_i / 2).
       A forward pass raises n_{i+1} where a layer merges more than half (pushing merges later);
       a backward pass from n_D = K lowers n_i to 2 n_{i+1} where the remaining layers cannot reach
       K (pulling merges earlier). Feasible schedules are left unchanged; this succeeds whenever
       K <= N <= K * 2^D.
    """
    r = [max(v, 0) for v in schedule]
    surplus = sum(r) - (num_tokens - kept)
    for i in reversed(range(len(r))):
        take = min(surplus, r[i])
        r[i] -= take
        surplus -= take
    n = [num_tokens]
    for v in r:  # forward: never merge more than half of the current tokens
        n.append(max(n[-1] - v, -(-n[-1] // 2)))
    n[-1] = kept
    for i in reversed(range(1, len(r))):  # backward: the remaining layers must be able to reach K
        n[i] = min(n[i], 2 * n[i + 1])
    return [n[i] - n[i + 1] for i in range(len(r))]


def merge_schedule(num_tokens: int, kept: int, depth: int, kind: str = "tome") -> list[int]:
    """Per-layer merge counts r_i taking num_tokens (L, excluding cls) to exactly kept (K) tokens.

    Guarantees sum(r) == L - K and 0 <= r_i <= n_i // 2 with n_i the tokens entering layer i.
    Kinds (the paper, App. A.1, names linear- and square-decreasing schedules without formulas):
      "tome":     the authors' default -- ToMe parse_r with inflection -0.5, r searched so the sum is
                  closest to L - K, remainder added to layer 0 (reproduces 256->144
                  [12,14,13,12,11,10,9,8,7,6,5,5], 1024->256 and 256->64 exactly);
      "constant": equal r_i, the remainder spread one each over the first layers;
      "linear":   r_i proportional to (depth - i);
      "square":   r_i proportional to (depth - i)^2 (our definition of "square decreasing").
    Proportional kinds are integerised by largest remainder. Any kind whose raw schedule breaks
    the half cap (small token counts) is repaired by moving merges to later / earlier layers, see
    `_repair`. Raises ValueError if K > L, K < 1, depth < 1 with merges to do, or L > K * 2^depth
    (even merging half the tokens in every layer cannot reach K).
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"merge_schedule: unknown kind {kind!r}; expected one of {SCHEDULE_KINDS}")
    if not 1 <= kept <= num_tokens:
        raise ValueError(f"merge_schedule: kept={kept} must be in [1, num_tokens={num_tokens}]")
    num_merge = num_tokens - kept
    if depth < 1:
        if num_merge:
            raise ValueError(f"merge_schedule: depth={depth} layers cannot merge {num_merge} tokens")
        return []
    if num_tokens > kept * 2 ** depth:
        raise ValueError(
            f"merge_schedule: cannot go from {num_tokens} to {kept} tokens in {depth} layers; "
            f"merging at most half per layer keeps at least {math.ceil(num_tokens / 2 ** depth)}")
    if num_merge == 0:
        return [0] * depth
    if kind == "tome":
        raw = _tome_schedule(num_merge, depth)
    elif kind == "constant":
        raw = _largest_remainder([1.0] * depth, num_merge)
    elif kind == "linear":
        raw = _largest_remainder([float(depth - i) for i in range(depth)], num_merge)
    else:
        raw = _largest_remainder([float(depth - i) ** 2 for i in range(depth)], num_merge)
    return _repair(raw, num_tokens, kept)
