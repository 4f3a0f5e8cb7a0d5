"""MergeAR (Sec. 4.1, Fig. 6, Eq. 16): raster decoding whose KV cache keeps only new tokens.

Sequence: [class, M(K), x_1, ..., x_L] in raster order over the L recovered positions, where
x_l is the code of position l's owner (merged group) and M is a merge-instruction embedding
indexed by K, the number of merged tokens. Both are prefix tokens (P = 2: RoPE cos = sin = 0);
M is never dropped for CFG (both halves get the same M). The loss covers all L targets.

Decided readings (README "Decisions"):
* Eq. (16) over an L x L mask from the K x L source S only makes sense as: position l is visible
  to later queries iff it is the first position of its merged group; a query always sees itself
  (a duplicate must still be a query to predict the next token). With slots s = P + l:
      A[q, k] = (k <= q) and (k < P or keep(k - P) or k == q).
* keep(l) is decided by CODES, not owners: keep(l) = x_l is the first occurrence of its code in
  the sequence. Inference has only codes ("duplicate" = a code already generated), and two merged
  groups can share a code, so an owner rule in training and a code rule at inference would
  disagree; the code rule is used in both. `keep_by_owner` gives the owner rule so the
  disagreement can be measured on real codes (`keep_rule_disagreement`).
* Pruned KV cache: a static buffer of P + K slots per sample plus a validity mask (ragged across
  the batch), and one working slot for the token being processed (a batch with per-sample K
  shares the buffer of the largest K). Each new input token is written at its sample's next
  free slot and attends to the valid slots plus itself; the slot is marked valid (and the
  pointer advanced) only if the token is new, so a duplicate is overwritten by the next token. RoPE is applied before caching, so kept
  keys keep their original positions. When any sample has produced more distinct tokens than the
  buffer holds, the buffer grows (counted in `MergeARStats`). With CFG both halves receive the same
  token, so their keep flags match.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from mergevq.generator.gpt import Decoding, FactorisedGPT, GPTConfig, eval_mode
from mergevq.generator.layers import CacheStep, grid_positions, prefix_positions

PREFIX_LEN = 2  # [class, M(K)]


# ---------------------------------------------------------------------------------------------
# Eq. (16): which tokens stay visible


def first_occurrence(values: Tensor) -> Tensor:
    """(B, L) -> (B, L) bool: True where values[b, l] does not occur in values[b, :l]."""
    sorted_vals, order = values.sort(dim=1, stable=True)  # stable: the earliest index leads each run
    lead = torch.ones_like(sorted_vals, dtype=torch.bool)
    lead[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    return torch.zeros_like(lead).scatter(1, order, lead)


def keep_by_code(codes: Tensor) -> Tensor:
    """The rule MergeAR uses: keep(l) = x_l is the first occurrence of its code. (B, L) -> (B, L) bool."""
    return first_occurrence(codes)


def keep_by_owner(owner: Tensor) -> Tensor:
    """Eq. (16) read on S: keep(l) = l is the first position of its merged group. owner: (B, L)."""
    return first_occurrence(owner)


def keep_rule_disagreement(codes: Tensor, owner: Tensor) -> Tensor:
    """Share of positions (per sequence, (B,) float) where the code and owner rules differ; they
    differ exactly where two merged groups share a code. codes, owner: (B, L)."""
    return (keep_by_code(codes) != keep_by_owner(owner)).float().mean(1)


def mergear_mask(keep: Tensor, prefix: int = PREFIX_LEN) -> Tensor:
    """Eq. (16) attention mask. keep: (B, T') bool for the token inputs at slots prefix .. prefix+T'-1.

    Returns (B, T, T) bool, T = prefix + T': A[q, k] = (k <= q) and (k < prefix or keep[k - prefix]
    or k == q).
    """
    b, n = keep.shape
    t = prefix + n
    visible = torch.cat([keep.new_ones(b, prefix), keep], dim=1)  # (B, T): may be seen by later queries
    idx = torch.arange(t, device=keep.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T) [q, k]
    return causal & (visible[:, None, :] | torch.eye(t, dtype=torch.bool, device=keep.device))


class MergeARStats(NamedTuple):
    """What a decode did to the cache."""

    # (B, L-1) entries held after input x_l (l = 0..L-2): pruned cache P + kept so far (the valid
    # slots), full cache or no cache P + l + 1
    cache_len: Tensor
    kept: Tensor  # (B,) distinct tokens kept (the last position is never an input)
    capacity: int  # final buffer size (slots)
    growths: int  # times the buffer grew
    rows_over_k: int  # samples that kept more than K tokens


class MergeARDecode(NamedTuple):
    codes: Tensor  # (B, L)
    logits: tuple[Tensor, ...] | None
    stats: MergeARStats


# ---------------------------------------------------------------------------------------------
# Model


class MergeAR(FactorisedGPT):
    """LlamaGen + a merge-instruction table M (one row per K in [1, L]); Eq. (16) mask; pruned cache."""

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.merge_instruction = nn.Embedding(config.num_tokens, config.dim)  # row K - 1 = M(K)
        nn.init.normal_(self.merge_instruction.weight, 0.0, config.init_std)

    def _kept_tensor(self, kept, batch: int, device) -> Tensor:
        if kept is None:
            raise ValueError("MergeAR needs kept= (the number of merged tokens K, int or (B,))")
        k = torch.as_tensor(kept, dtype=torch.long, device=device).flatten()
        k = k.expand(batch) if k.numel() == 1 else k
        n = self.config.num_tokens
        if k.shape[0] != batch or k.min() < 1 or k.max() > n:
            raise ValueError(f"kept must be an int or ({batch},) tensor in [1, L = {n}], got {kept}")
        return k

    def prefix_embeddings(self, labels: Tensor, kept: Tensor) -> Tensor:
        """(B,), (B,) -> (B, 2, dim): [class, M(K)]."""
        return torch.cat([self.embed_labels(labels), self.merge_instruction(kept - 1)[:, None]], dim=1)

    def hidden_states(self, codes: Tensor, labels: Tensor, kept=None, keep: Tensor | None = None) -> Tensor:
        """Backbone outputs (B, L, dim) predicting x_1..x_L under the Eq. (16) mask.

        keep: (B, L) bool visibility (default keep_by_code(codes)); all-True is plain causal
        attention (the negative control), keep_by_owner(owner) the owner rule.
        """
        self._check_codes(codes, labels)
        b, n = codes.shape
        kept = self._kept_tensor(kept, b, codes.device)
        keep = keep_by_code(codes) if keep is None else keep
        x = torch.cat([self.prefix_embeddings(labels, kept), self.embed_codes(codes[:, :-1])], dim=1)
        pos = torch.cat([prefix_positions(b, PREFIX_LEN, codes.device),
                         grid_positions(torch.arange(n - 1, device=codes.device), self.config.grid)
                         .expand(b, -1, -1)], dim=1)  # (B, P + L - 1, 2)
        h = self.run_backbone(self.tok_dropout(x), pos, mergear_mask(keep[:, :-1]))
        return h[:, PREFIX_LEN - 1:]  # slot P - 1 + l predicts x_l

    @torch.no_grad()
    def generate(self, labels: Tensor, *, kept=None, cfg_scale=1.0, temperature=1.0, top_k=None,
                 top_p=None, seeds=None, force=None, return_logits=False, use_cache=True,
                 prune_cache=True):
        """Raster decoding with the Eq. (16) visibility. prune_cache=True: the pruned cache of
        P + K slots per sample; False: the full cache with the Eq. (16) mask (the baseline);
        use_cache=False: recompute the masked sequence every step."""
        out = self.generate_with_stats(labels, kept=kept, cfg_scale=cfg_scale, temperature=temperature,
                                       top_k=top_k, top_p=top_p, seeds=seeds, force=force,
                                       return_logits=return_logits, use_cache=use_cache,
                                       prune_cache=prune_cache)
        return (out.codes, out.logits) if return_logits else out.codes

    @torch.no_grad()
    def generate_with_stats(self, labels: Tensor, *, kept=None, cfg_scale=1.0, temperature=1.0,
                            top_k=None, top_p=None, seeds=None, force=None, return_logits=False,
                            use_cache=True, prune_cache=True) -> MergeARDecode:
        n, p, dev = self.config.num_tokens, PREFIX_LEN, labels.device
        dec = Decoding(self, labels, n, cfg_scale, temperature, top_k, top_p, seeds, force, return_logits)
        r, b = dec.rows, dec.batch
        kept = self._kept_tensor(kept, b, dev)
        prune = use_cache and prune_cache
        # pruned: P + K kept entries + 1 working slot for the token being processed (a duplicate
        # is written there, read by itself, then overwritten); full: every input has its slot
        size = p + (int(kept.max()) + 1 if prune else n - 1)
        cache = self.new_cache(r, size) if use_cache else None
        valid = torch.zeros(r, size, dtype=torch.bool, device=dev)  # slots later queries may read
        count = torch.full((r,), p, dtype=torch.long, device=dev)  # next free slot (pruned cache)
        cache_len = torch.zeros(b, max(n - 1, 0), dtype=torch.long, device=dev)
        growths, grow_by = 0, max(1, n // 16)
        rows = torch.arange(r, device=dev)
        x = self.prefix_embeddings(dec.model_labels, dec.expand(kept))  # (R, P, dim)
        pos = prefix_positions(r, p, dev)
        keep_all = torch.zeros(r, 0, dtype=torch.bool, device=dev)  # keep flags of inputs so far
        with eval_mode(self):
            for t in range(n):
                if t == 0:  # prefill [class, M(K)]
                    mask = mergear_mask(keep_all, p)
                    prefill = (None if cache is None else
                               CacheStep(cache, torch.arange(p, device=dev).expand(r, -1), p))
                    h = self.run_backbone(x, pos, mask, prefill)[:, -1]
                    if cache is not None:
                        valid[:, :p] = True
                elif cache is None:  # recompute the whole masked sequence
                    h = self.run_backbone(x, pos, mergear_mask(keep_all, p))[:, -1]
                    cache_len[:, t - 1] = p + t  # entries recomputed
                else:
                    new_keep = keep_all[:, -1]  # (R,) is input x_{t-1} a new code?
                    slot = count if prune else torch.full((r,), p + t - 1, device=dev)
                    if int(slot.max()) >= cache.size:  # a sample outgrew its P + K slots
                        cache.grow(grow_by)
                        valid = torch.cat([valid, valid.new_zeros(r, grow_by)], dim=1)
                        growths += 1
                    length = int(slot.max()) + 1
                    mask = valid[:, :length].clone()
                    mask[rows, slot] = True  # the query always sees itself
                    step_ = CacheStep(cache, slot[:, None], length)
                    h = self.run_backbone(x, pos, mask[:, None], step_)[:, 0]
                    valid[rows, slot] = new_keep
                    count = count + new_keep.long()
                    cache_len[:, t - 1] = (count if prune else torch.full_like(count, p + t))[:b]
                code = dec.pick(h[:, None], torch.full((b, 1), t, device=dev), t)  # (B, 1)
                seen = (dec.codes[:, :t] == code).any(1, keepdim=True)  # code rule, (B, 1)
                keep_all = torch.cat([keep_all, dec.expand(~seen)], dim=1)
                x_new = self.embed_codes(dec.expand(code))  # (R, 1, dim)
                pos_new = grid_positions(torch.tensor([t], device=dev), self.config.grid).expand(r, -1, -1)
                x = x_new if cache is not None else torch.cat([x, x_new], dim=1)
                pos = pos_new if cache is not None else torch.cat([pos, pos_new], dim=1)
        n_kept = keep_all[:b, :-1].sum(1)  # inputs x_0 .. x_{L-2} that were new
        stats = MergeARStats(cache_len, n_kept, cache.size if cache is not None else 0, growths,
                             int((n_kept > kept).sum()))
        res = dec.result()
        return MergeARDecode(*(res if return_logits else (res, None)), stats)
