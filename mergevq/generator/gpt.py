"""LlamaGen-L with Open-MAGVIT2's factorised vocabulary: the paper's "LlamaGen-L, 343M" on 2^18 codes.

The code of a token (an index in [0, 2^bits), LSB first as `mergevq.tokenizer.lfq.codes_to_indices`)
is split into sub-tokens of `bits_split` bits, channel 0 in the least significant bit of sub-token
1 ([6, 12] at 18 bits: channels 0-5 -> a 64-way token, 6-17 -> a 4096-way token).

* Input: class embedding (a prefix token; the last row of the table is the null class of CFG),
  then per token the SUM of its sub-token embeddings; token dropout on the input embeddings.
* Backbone: LlamaGen blocks (`layers.py`) with 2D RoPE; the class prefix has q = k = 0.
* Factorised head (Open-MAGVIT2's "intra" transformer): per position t, `n_intra_layer` blocks of
  the same width run causally over [h_t, emb_1(s_1), ..., emb_{k-1}(s_{k-1})] (the sub-token
  embedding tables are shared with the input), one final RMSNorm, head i on slot i. Sub-tokens are
  teacher-forced in training and sampled one after another at inference, so
  p(code) = p(s_1) p(s_2 | s_1) ... and the loss is CE_1 + CE_2 (+ ...).
  Open-MAGVIT2 passes the prefix's zero RoPE and the (0, 0) position to the two intra slots; here
  the intra blocks use no RoPE at all (the causal mask already orders the 2 slots). Parameter
  counts are unaffected: 343,570,432 for LlamaGen-L at [6, 12] with 1000 classes.
* Raster order (LlamaGen): sequence [class, x_1, ..., x_{N-1}], token x_l carries the RoPE of its
  own grid position, the output at slot l predicts x_{l+1} (slot 0 = class predicts x_1).

`FactorisedGPT` is the shared core of LlamaGen, MergeAR (`mergear.py`) and RandAR (`randar.py`):
they differ only in `hidden_states` (what sequence, which RoPE positions and mask) and in their
decoding loops, which use `run_backbone` with a `KVCache` and `Decoding` (CFG, per-row noise,
forcing, logits) from this file.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mergevq.generator.layers import (Block, CacheStep, KVCache, RMSNorm, grid_positions,
                                      prefix_positions, rope_from_positions, swiglu_hidden)
from mergevq.generator.sample import cfg_combine, default_seeds, draw, row_uniforms, sampling_settings

KINDS = ("llamagen", "mergear", "randar")


# ---------------------------------------------------------------------------------------------
# Configuration, sub-token split


def default_bits_split(bits: int) -> tuple[int, int]:
    """Sub-token split of a code: first = ceil(bits / 3), rest second (18 -> (6, 12), 10 -> (4, 6))."""
    if bits < 2:
        raise ValueError(f"codebook_bits must be >= 2 to factorise, got {bits}")
    first = -(-bits // 3)
    return first, bits - first


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of one generator (defaults: LlamaGen-L on the 2^18 codebook, 16 x 16 grid)."""

    kind: str = "llamagen"  # "llamagen" (raster) | "mergear" | "randar"
    n_layer: int = 24
    n_head: int = 16
    dim: int = 1024
    multiple_of: int = 256  # SwiGLU hidden = find_multiple(int(8 * dim / 3), multiple_of)
    n_intra_layer: int = 2  # Open-MAGVIT2's factorised "intra" blocks
    codebook_bits: int = 18
    sub_token_bits: tuple[int, ...] | None = None  # None = default_bits_split(codebook_bits)
    num_classes: int = 1000  # + 1 null row for CFG
    grid: int = 16  # RoPE grid side
    seq_len: int = 0  # tokens per sequence; 0 = grid * grid (RandAR: K merged tokens <= grid^2)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    token_dropout: float = 0.1  # dropout on the input embeddings
    attn_dropout: float = 0.0
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    class_dropout: float = 0.1  # labels -> null in training (loss())
    init_std: float = 0.02

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"GPTConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.sub_token_bits is not None:
            object.__setattr__(self, "sub_token_bits", tuple(int(b) for b in self.sub_token_bits))
            if sum(self.sub_token_bits) != self.codebook_bits or min(self.sub_token_bits) < 1:
                raise ValueError(f"sub_token_bits {self.sub_token_bits} must be positive and sum to "
                                 f"codebook_bits {self.codebook_bits}")
        if self.seq_len < 0 or self.seq_len > self.grid * self.grid:
            raise ValueError(f"seq_len {self.seq_len} must be in [0, grid^2 = {self.grid ** 2}]")
        if self.kind != "randar" and self.seq_len not in (0, self.grid * self.grid):
            raise ValueError(f"{self.kind}: seq_len must be grid^2 = {self.grid ** 2}, got {self.seq_len}")
        if self.dim % self.n_head or (self.dim // self.n_head) % 4:
            raise ValueError(f"dim {self.dim} / n_head {self.n_head} must be a multiple of 4 (2D RoPE)")

    @property
    def bits_split(self) -> tuple[int, ...]:
        return self.sub_token_bits or default_bits_split(self.codebook_bits)

    @property
    def num_tokens(self) -> int:
        return self.seq_len or self.grid * self.grid

    @property
    def ffn_hidden(self) -> int:
        return swiglu_hidden(self.dim, self.multiple_of)


def split_codes(indices: Tensor, bits_split) -> tuple[Tensor, ...]:
    """Full code indices (...) -> one sub-token index tensor per part, LSB part first."""
    parts, shift = [], 0
    for b in bits_split:
        parts.append((indices >> shift) & ((1 << b) - 1))
        shift += b
    return tuple(parts)


def merge_codes(parts, bits_split) -> Tensor:
    """Inverse of split_codes."""
    out, shift = torch.zeros_like(parts[0]), 0
    for p, b in zip(parts, bits_split):
        out = out | (p.long() << shift)
        shift += b
    return out


class GeneratorLoss(NamedTuple):
    loss: Tensor  # sum of the per-sub-token cross-entropies
    per_subtoken: tuple[Tensor, ...]


# ---------------------------------------------------------------------------------------------
# The shared core


class FactorisedGPT(nn.Module):
    """Class-conditional GPT with a factorised code vocabulary; raster-order LlamaGen by default."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        c = self.config = config
        self.cls_embedding = nn.Embedding(c.num_classes + 1, c.dim)  # last row: null class
        self.tok_embeddings = nn.ModuleList(nn.Embedding(2 ** b, c.dim) for b in c.bits_split)
        self.tok_dropout = nn.Dropout(c.token_dropout)
        block = dict(dim=c.dim, n_head=c.n_head, ffn_hidden=c.ffn_hidden, norm_eps=c.norm_eps,
                     attn_dropout=c.attn_dropout, resid_dropout=c.resid_dropout,
                     ffn_dropout=c.ffn_dropout)
        self.layers = nn.ModuleList(Block(**block) for _ in range(c.n_layer))
        self.intra = nn.ModuleList(Block(**block) for _ in range(c.n_intra_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.heads = nn.ModuleList(nn.Linear(c.dim, 2 ** b, bias=False) for b in c.bits_split)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) for linear and embedding weights, zero output heads (LlamaGen)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, self.config.init_std)
        for h in self.heads:
            nn.init.zeros_(h.weight)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # -- checks ---------------------------------------------------------------------------------
    def _check_labels(self, labels: Tensor) -> None:
        if labels.ndim != 1:
            raise ValueError(f"labels must be (B,), got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_class):
            raise ValueError(f"labels must be in [0, num_classes = {self.null_class}] (the last is "
                             f"the null class), got range [{labels.min()}, {labels.max()}]")

    def _check_codes(self, codes: Tensor, labels: Tensor, n: int | None = None) -> None:
        n = self.config.num_tokens if n is None else n
        if codes.ndim != 2 or codes.shape[1] != n or codes.shape[0] != labels.shape[0]:
            raise ValueError(f"codes must be (B={labels.shape[0]}, N={n}), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= 2 ** self.config.codebook_bits):
            raise ValueError(f"codes must be in [0, 2^{self.config.codebook_bits}), got range "
                             f"[{codes.min()}, {codes.max()}]")
        self._check_labels(labels)

    # -- pieces ---------------------------------------------------------------------------------
    def embed_codes(self, codes: Tensor) -> Tensor:
        """(B, T) full codes -> (B, T, dim): sum of the sub-token embeddings."""
        parts = split_codes(codes, self.config.bits_split)
        return sum(emb(p) for emb, p in zip(self.tok_embeddings, parts))

    def embed_labels(self, labels: Tensor) -> Tensor:
        """(B,) -> (B, 1, dim)."""
        return self.cls_embedding(labels)[:, None]

    def run_backbone(self, x: Tensor, pos: Tensor, mask: Tensor | None = None,
                     cache: CacheStep | None = None) -> Tensor:
        """x: (B, T, dim) input embeddings; pos: (B, T, 2) RoPE positions (PREFIX rows = prefix);
        mask: (B, T, S) bool (None = causal over x, only without a cache). Returns (B, T, dim)."""
        c = self.config
        rope = rope_from_positions(pos, c.dim // c.n_head, c.rope_base)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, i)
        return x

    def intra_logits(self, hidden: Tensor, codes: Tensor) -> tuple[Tensor, ...]:
        """Teacher-forced factorised head. hidden: (B, T, dim) backbone outputs at the positions
        that predict `codes` (B, T). Returns one (B, T, 2^b_i) logits tensor per sub-token."""
        parts = split_codes(codes, self.config.bits_split)
        seq = [hidden] + [emb(p) for emb, p in zip(self.tok_embeddings[:-1], parts[:-1])]
        ctx = torch.stack(seq, dim=2).flatten(0, 1)  # (B*T, k, dim)
        for block in self.intra:
            ctx = block(ctx, None, None)
        ctx = self.norm(ctx).unflatten(0, hidden.shape[:2])  # (B, T, k, dim)
        return tuple(head(ctx[:, :, i]) for i, head in enumerate(self.heads))

    def decode_subtokens(self, hidden: Tensor, choose) -> Tensor:
        """Sample the sub-tokens of one code per row, one after another.

        hidden: (R, dim); choose(i, logits_i (R, 2^b_i)) -> (R,) long sub-token i (what every row's
        intra blocks see next, e.g. the CFG-guided sample for both halves). Returns (R,) codes.
        """
        seq, parts = [hidden], []
        for i, head in enumerate(self.heads):
            ctx = torch.stack(seq, dim=1)  # (R, i + 1, dim)
            for block in self.intra:
                ctx = block(ctx, None, None)
            parts.append(choose(i, head(self.norm(ctx[:, -1]))))
            if i + 1 < len(self.heads):
                seq.append(self.tok_embeddings[i](parts[-1]))
        return merge_codes(parts, self.config.bits_split)

    def new_cache(self, batch: int, size: int) -> KVCache:
        c, w = self.config, self.cls_embedding.weight
        return KVCache(c.n_layer, batch, c.n_head, size, c.dim // c.n_head, w.dtype, w.device)

    # -- teacher forcing, loss ------------------------------------------------------------------
    def hidden_states(self, codes: Tensor, labels: Tensor) -> Tensor:
        """Raster order: backbone outputs (B, N, dim) at the slots that predict x_1 .. x_N."""
        self._check_codes(codes, labels)
        b, n = codes.shape
        x = torch.cat([self.embed_labels(labels), self.embed_codes(codes[:, :-1])], dim=1)  # (B, N, d)
        pos = torch.cat([prefix_positions(b, 1, codes.device),
                         grid_positions(torch.arange(n - 1, device=codes.device), self.config.grid)
                         .expand(b, -1, -1)], dim=1)  # (B, N, 2)
        return self.run_backbone(self.tok_dropout(x), pos)

    def teacher_forced_logits(self, codes: Tensor, labels: Tensor, **kind_specific) -> tuple[Tensor, ...]:
        """codes (B, N) long, labels (B,) long (num_classes = null) -> one (B, N, 2^b_i) per sub-token."""
        return self.intra_logits(self.hidden_states(codes, labels, **kind_specific), codes)

    def loss(self, codes: Tensor, labels: Tensor, label_smoothing: float = 0.0,
             **kind_specific) -> GeneratorLoss:
        """Sum over sub-tokens of the mean cross-entropy; labels dropped to null with p =
        class_dropout in training mode only."""
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.config.class_dropout
            labels = labels.masked_fill(drop, self.null_class)
        logits = self.teacher_forced_logits(codes, labels, **kind_specific)
        targets = split_codes(codes, self.config.bits_split)
        ces = tuple(F.cross_entropy(lg.flatten(0, 1).float(), t.flatten(), label_smoothing=label_smoothing)
                    for lg, t in zip(logits, targets))
        return GeneratorLoss(sum(ces), ces)

    # -- raster decoding ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, labels: Tensor, *, cfg_scale=1.0, temperature=1.0, top_k=None, top_p=None,
                 seeds: Tensor | None = None, force: Tensor | None = None,
                 return_logits: bool = False, use_cache: bool = True):
        """Raster-order decoding, prefill of the class token then one token per step.

        Returns codes (B, N), or (codes, logits per sub-token (B, N, 2^b_i)) with return_logits;
        the logits are the CFG-combined ones before temperature/top-k/top-p. use_cache=False
        recomputes the whole prefix at every step (the reference for the cache's speed-up).
        """
        n = self.config.num_tokens
        dec = Decoding(self, labels, n, cfg_scale, temperature, top_k, top_p, seeds, force, return_logits)
        r, dev = dec.rows, labels.device
        x = self.embed_labels(dec.model_labels)  # (R, 1, dim)
        pos = prefix_positions(r, 1, dev)
        cache = self.new_cache(r, n) if use_cache else None
        with eval_mode(self):
            for t in range(n):
                if cache is None:  # the whole sequence so far, causal
                    h = self.run_backbone(x, pos)[:, -1]
                else:  # only the newest token; it reads cache slots [0, t] (all visible)
                    step = CacheStep(cache, torch.full((r, 1), t, device=dev), t + 1)
                    mask = torch.ones(r, 1, t + 1, dtype=torch.bool, device=dev)
                    h = self.run_backbone(x, pos, mask, step)[:, 0]
                code = dec.pick(h[:, None], torch.full((dec.batch, 1), t, device=dev), t)  # (B, 1)
                x_new = self.embed_codes(dec.expand(code))  # (R, 1, dim)
                pos_new = grid_positions(torch.tensor([t], device=dev), self.config.grid).expand(r, -1, -1)
                x = x_new if cache is not None else torch.cat([x, x_new], dim=1)
                pos = pos_new if cache is not None else torch.cat([pos, pos_new], dim=1)
        return dec.result()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run in eval mode (no dropout) and restore the previous mode afterwards."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


# ---------------------------------------------------------------------------------------------
# Decoding bookkeeping shared by every generator's generate()


class Decoding:
    """CFG batch, per-row noise, forcing and logits of one generate() call.

    With guidance (any cfg_scale != 1) the model batch is [cond; null] (R = 2B rows); logits are
    combined as u + s (c - u) and the guided sub-token is fed to both halves' intra blocks and
    next inputs. Row b's k-th decoded token uses uniforms noise[b, k, :], so codes do not depend
    on the batch a row is in.
    """

    def __init__(self, model: FactorisedGPT, labels: Tensor, n: int, cfg_scale, temperature, top_k,
                 top_p, seeds, force, return_logits, always_guided: bool = False, extra_uniforms: int = 0):
        model._check_labels(labels)
        k = len(model.config.bits_split)
        self.model, self.n, self.batch = model, n, labels.shape[0]
        self.settings = sampling_settings(k, cfg_scale, temperature, top_k, top_p)
        self.guided = always_guided or any(s.cfg_scale != 1.0 for s in self.settings)
        self.rows = 2 * self.batch if self.guided else self.batch
        null = torch.full_like(labels, model.null_class)
        self.model_labels = torch.cat([labels, null]) if self.guided else labels
        dev = labels.device
        if seeds is None:
            seeds = default_seeds(self.batch)
        seeds = torch.as_tensor(seeds, dtype=torch.int64).flatten()
        if seeds.shape[0] != self.batch:
            raise ValueError(f"seeds must be ({self.batch},), got {tuple(seeds.shape)}")
        u = row_uniforms(seeds, n * k + extra_uniforms, dev)
        self.noise = u[:, :n * k].view(self.batch, n, k)  # (B, N, k)
        self.extra = u[:, n * k:]  # (B, extra_uniforms), e.g. RandAR's per-row order
        if force is not None:
            model._check_codes(force, labels, n)
            force = split_codes(force.to(dev), model.config.bits_split)
        self.force = force
        self.codes = torch.zeros(self.batch, n, dtype=torch.long, device=dev)
        self.logits = ([torch.zeros(self.batch, n, 2 ** b, device=dev) for b in model.config.bits_split]
                       if return_logits else None)

    def expand(self, t: Tensor) -> Tensor:
        """(B, ...) -> (R, ...): duplicate for the null half under CFG."""
        return torch.cat([t, t]) if self.guided else t

    def pick(self, hidden: Tensor, out_slots: Tensor, noise_step, cfg_scale=None) -> Tensor:
        """Decode one code per query. hidden: (R, q, dim); out_slots: (B, q) columns of the output;
        noise_step: int or (q,) long, index of each query's uniforms. cfg_scale (one float per
        sub-token) overrides the settings' scales (RandAR's ramp). Returns codes (B, q), also
        stored in the output."""
        r, q, _ = hidden.shape
        b = self.batch
        steps = torch.as_tensor(noise_step, device=hidden.device).reshape(-1).expand(q)

        def choose(i: int, logits: Tensor) -> Tensor:
            logits = logits.float().view(r, q, -1)  # (R, q, V)
            if self.guided:
                scale = self.settings[i].cfg_scale if cfg_scale is None else cfg_scale[i]
                logits = cfg_combine(logits, scale)  # (B, q, V)
            if self.logits is not None:
                self.logits[i].scatter_(1, out_slots[..., None].expand(-1, -1, logits.shape[-1]), logits)
            if self.force is not None:
                sub = self.force[i].gather(1, out_slots)  # (B, q)
            else:
                u = self.noise[:, steps, i]  # (B, q)
                sub = draw(logits.flatten(0, 1), u.flatten(), self.settings[i]).view(b, q)
            return self.expand(sub).flatten()  # (R * q,)

        codes = self.model.decode_subtokens(hidden.flatten(0, 1), choose).view(r, q)[:b]  # (B, q)
        self.codes.scatter_(1, out_slots, codes)
        return codes

    def result(self):
        return (self.codes, tuple(self.logits)) if self.logits is not None else self.codes
