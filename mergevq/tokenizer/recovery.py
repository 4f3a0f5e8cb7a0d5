"""Token recovery (Eq. 13-14) and the learned Source Recovery model (Eq. 9-11, Table A2).

Token recovery copies every kept token back to the positions it covers: Z_L = S^T Z_Kq.
Source Recovery predicts S from the K quantised tokens alone (inference, RandAR generation): a
2-layer Transformer decoder (width 384, 8 heads, FFN 1536) in which L learnable queries, one per
position, self-attend and cross-attend to the K tokens (App. A.1: "similar to Maskformer"); the
logits of position l over the K tokens are the scaled dot products of the projected query l with
the projected tokens (Eq. 10). The K tokens get no positional embedding: they are a set, whose
order carries no information the model could use at inference.

Canonical decoding. The encoder sorts the kept tokens by the first position each covers
(encoder.order_by_first_position), so a true S is "canonical": token k's first position rises with
k (token 0 starts at position 0) and every position belongs to a token that starts at or before it.
Eq. (10)'s per-position argmax ignores this and returns matrices no encoder can produce (a token
owning nothing, a position given to a token that starts after it). `canonical_owners` is the
argmax of the same summed log-probabilities over canonical matrices only, exact by dynamic
programming in O(L K); `predict_source` / `SourceRecovery.predict` decode with it.

Fine-tuning (`mergevq finetune-recovery`, App. A.2, Table A2) writes a recovery.pt: the recovery's
weights, and optionally a decoder fine-tuned on S_hat; `load_recovery` rebuilds it as a
`FinetunedRecovery` beside its frozen tokenizer.

Shapes: B batch, K kept tokens, L positions, D code channels (bits), d recovery width.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def token_recovery(quantized: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Eq. (14): quantized Z_Kq (B, K, D), source S (B, K, L) binary -> Z_L (B, L, D).

    z_l = sum_i s_il z_qi: with a partition S (each position owned by exactly one token) this
    copies token i to every position it covers; it is exact in any float dtype since S is 0/1.
    """
    if quantized.shape[:2] != source.shape[:2]:
        raise ValueError(f"token_recovery: quantized {tuple(quantized.shape)} and source "
                         f"{tuple(source.shape)} disagree on (B, K)")
    return torch.bmm(source.transpose(1, 2).to(quantized.dtype), quantized)


def source_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Eq. (10): logits (B, L, K) -> one-hot source S_hat (B, K, L), float32.

    Every position goes to its argmax token, so S_hat is a partition of the L positions (a token
    may own none). Built with scatter rather than F.one_hot, which reads the indices on the host
    and therefore cannot run on the meta device.
    """
    B, L, K = logits.shape
    owner = logits.argmax(dim=-1)  # (B, L)
    source = torch.zeros(B, K, L, device=logits.device, dtype=torch.float32)
    return source.scatter_(1, owner[:, None, :], 1.0)


def canonical_owners(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, L, K), K <= L -> owners (B, L) int64: the canonical source matrix (module
    docstring) with the largest sum over positions of log S_hat, S_hat = softmax over K (Eq. 10).

    Eq. (10)'s argmax restricted to the matrices the encoder can produce: token k - 1 starts at
    position l or l joins the best token already started. value[:, k] is the best score of
    positions 0..l with tokens 0..k-1 started; Viterbi over l, then back-tracking. Exact: a test
    checks it against enumeration of every canonical matrix.
    """
    B, L, K = logits.shape
    if K > L:
        raise ValueError(f"canonical_owners: {K} tokens cannot each own one of {L} positions")
    s = logits.float().log_softmax(dim=-1)  # (B, L, K)
    best = s.cummax(dim=-1)  # best.values[..., j]: the best of tokens 0..j, best.indices: which
    value = s.new_full((B, K + 1), float("-inf"))
    value[:, 1] = s[:, 0, 0]  # token 0 starts at position 0
    started = torch.zeros(B, L, K + 1, dtype=torch.bool, device=s.device)
    started[:, 0, 1] = True
    pad = s.new_full((B, 1), float("-inf"))
    for l in range(1, L):
        start = torch.cat([pad, value[:, :-1] + s[:, l]], dim=1)  # token k - 1 starts at l
        join = torch.cat([pad, value[:, 1:] + best.values[:, l]], dim=1)  # l joins a started token
        started[:, l] = start > join
        value = torch.maximum(start, join)
    owners = torch.empty(B, L, dtype=torch.long, device=s.device)
    k = torch.full((B,), K, dtype=torch.long, device=s.device)
    rows = torch.arange(B, device=s.device)
    for l in range(L - 1, -1, -1):
        new = started[rows, l, k]
        owners[:, l] = torch.where(new, k - 1, best.indices[rows, l, (k - 1).clamp(min=0)])
        k = k - new.long()
    return owners


def source_from_owners(owners: torch.Tensor, kept: int) -> torch.Tensor:
    """owners (B, L) int64 -> one-hot source (B, K, L) float32."""
    B, L = owners.shape
    source = torch.zeros(B, kept, L, device=owners.device, dtype=torch.float32)
    return source.scatter_(1, owners[:, None, :], 1.0)


def canonical_source(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, L, K) -> S_hat (B, K, L): the canonical matrix of `canonical_owners`."""
    return source_from_owners(canonical_owners(logits), logits.shape[-1])


def source_recovery_loss(logits: torch.Tensor, source: torch.Tensor, kind: str = "bce",
                         eps: float = 1e-6) -> torch.Tensor:
    """Eq. (11): loss between S_hat = softmax over K of logits and the true source S.

    logits (B, L, K), source (B, K, L) binary partition -> scalar fp32.
    "bce": Eq. (11) as written, - S log S_hat - (1 - S) log(1 - S_hat), averaged over the
           B * K * L entries; log S_hat is a log-softmax (exact), log(1 - S_hat) is taken of
           S_hat clamped to 1 - eps so a confident correct prediction cannot give 0 * log 0.
    "ce":  per-position cross-entropy over the K tokens, target = the token owning the position
           (the argmax form of Eq. 10 trained directly), averaged over B * L positions.
    """
    if logits.shape != (source.shape[0], source.shape[2], source.shape[1]):
        raise ValueError(f"source_recovery_loss: logits {tuple(logits.shape)} must be (B, L, K) "
                         f"for source {tuple(source.shape)} (B, K, L)")
    logits = logits.float()
    source = source.float()
    if kind == "bce":
        log_p = logits.log_softmax(dim=-1).transpose(1, 2)  # (B, K, L) log S_hat
        log_not_p = torch.log1p(-log_p.exp().clamp(max=1.0 - eps))  # log(1 - S_hat)
        return -(source * log_p + (1.0 - source) * log_not_p).mean()  # Eq. (11)
    if kind == "ce":
        owner = source.argmax(dim=1)  # (B, L)
        return F.cross_entropy(logits.transpose(1, 2), owner)
    raise ValueError(f"source_recovery_loss: unknown kind {kind!r}; expected 'bce' or 'ce'")


def rank_features(num: int, frequencies: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fourier features of the relative ranks (k + 1/2) / num, k < num: (num, 2 * frequencies)."""
    rank = (torch.arange(num, device=device, dtype=torch.float32) + 0.5) / num  # (num,)
    angles = rank[:, None] * torch.arange(1, frequencies + 1, device=device, dtype=torch.float32) * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


class SourceRecovery(nn.Module):
    """Predicts the source matrix from the K quantised tokens (Eq. 9-10).

    num_tokens: L (one learnable query per position); code_dim: D; dim, depth, num_heads, ffn_dim:
    Table A2 (384, 2, 8, 1536). Layers are PyTorch's standard pre-norm Transformer decoder layer
    (self-attention over queries, cross-attention to the tokens, GELU FFN), no dropout.
    """

    ORDER_FREQUENCIES = 16  # Fourier features of the relative rank

    def __init__(self, num_tokens: int, code_dim: int, dim: int = 384, depth: int = 2,
                 num_heads: int = 8, ffn_dim: int = 1536, use_order: bool = True):
        super().__init__()
        self.num_tokens = num_tokens
        self.dim = dim
        self.queries = nn.Parameter(torch.zeros(1, num_tokens, dim))  # Q of Eq. (9)
        self.token_embed = nn.Linear(code_dim, dim)
        self.order_embed = nn.Linear(2 * self.ORDER_FREQUENCIES, dim) if use_order else None
        self.token_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(dim, num_heads, ffn_dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth))
        self.query_norm = nn.LayerNorm(dim)
        self.query_head = nn.Linear(dim, dim)
        self.key_head = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.queries, std=0.02)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        """quantized (B, K, D) -> logits (B, L, K); softmax over K is S_hat^T of Eq. (10)."""
        tokens = self.token_embed(quantized)  # (B, K, d)
        if self.order_embed is not None:
            tokens = tokens + self.order_embed(rank_features(quantized.shape[1], self.ORDER_FREQUENCIES,
                                                             tokens.device, tokens.dtype))
        tokens = self.token_norm(tokens)
        q = self.queries.expand(quantized.shape[0], -1, -1)  # (B, L, d)
        for layer in self.layers:
            q = layer(q, tokens)  # Eq. (9): Q_r
        q = self.query_head(self.query_norm(q))  # (B, L, d)
        k = self.key_head(tokens)  # (B, K, d)
        return q @ k.transpose(1, 2) / math.sqrt(self.dim)  # (B, L, K)

    @torch.no_grad()
    def predict(self, quantized: torch.Tensor) -> torch.Tensor:
        """quantized (B, K, D) in canonical order -> S_hat (B, K, L), a canonical source matrix."""
        return predict_source(self, quantized)


def predict_source(recovery: nn.Module, quantized: torch.Tensor, decode: str = "canonical") -> torch.Tensor:
    """S_hat (B, K, L) of K quantised tokens (B, K, D) given in canonical order (the encoder's,
    and a generator's slot order), no S needed: what RandAR generation decodes with (Sec. 4.2).

    decode: "canonical" (canonical_source, the default everywhere) or "argmax" (Eq. 10 per
    position). Codes as indices (B, K) become `quantized` with lfq.indices_to_codes(indices, bits).
    """
    logits = recovery(quantized)
    if decode == "canonical":
        return canonical_source(logits)
    if decode == "argmax":
        return source_from_logits(logits)
    raise ValueError(f"predict_source: unknown decode {decode!r}; expected 'canonical' or 'argmax'")


# ---------------------------------------------------------------------------------------------
# Fine-tuned Source Recovery (`mergevq finetune-recovery`): the recovery.pt artefact

RECOVERY_FORMAT = "mergevq-recovery/1"


class FinetunedRecovery(nn.Module):
    """A Source Recovery fine-tuned on a frozen tokenizer, with the decoder its S_hat feeds: the
    one fine-tuned on S_hat when the run trained one (`finetune_decoder`), else the tokenizer's."""

    def __init__(self, recovery: SourceRecovery, decoder: nn.Module, decoder_finetuned: bool):
        super().__init__()
        self.recovery, self.decoder, self.decoder_finetuned = recovery, decoder, decoder_finetuned

    @torch.no_grad()
    def source(self, quantized: torch.Tensor) -> torch.Tensor:
        """quantized (B, K, D) -> S_hat (B, K, L) (predict_source)."""
        return predict_source(self.recovery, quantized)

    @torch.no_grad()
    def decode(self, quantized: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """quantized (B, K, D) -> images (B, 3, H, W) through S_hat (Eq. 14-15); `source` reuses one
        already predicted."""
        source = self.source(quantized) if source is None else source
        return self.decoder(token_recovery(quantized, source))


def recovery_artifact(recovery: SourceRecovery, decoder: nn.Module | None, **meta) -> dict:
    """What recovery.pt holds: format, the recovery's weights, the S_hat decoder's (or None), and
    `meta` (variant, tokenizer_sha256, the fine-tuning settings)."""
    return {"format": RECOVERY_FORMAT, "recovery": recovery.state_dict(),
            "decoder": None if decoder is None else decoder.state_dict(), **meta}


def load_recovery(path: str | Path, tokenizer: nn.Module, tokenizer_sha256: str | None = None) -> FinetunedRecovery:
    """A recovery.pt (`mergevq finetune-recovery`) beside the tokenizer it was fine-tuned on.

    tokenizer: the loaded MergeVQ (its recovery and decoder are copied, never changed);
    tokenizer_sha256: that tokenizer's file hash, checked against the one the run recorded.
    """
    from mergevq.files import load_checkpoint

    art = load_checkpoint(path, weights_only=False)
    if not isinstance(art, dict) or art.get("format") != RECOVERY_FORMAT:
        raise ValueError(f"{path} is not a fine-tuned Source Recovery (format {RECOVERY_FORMAT!r}; made by "
                         "`mergevq finetune-recovery`)")
    if tokenizer_sha256 is not None and art.get("tokenizer_sha256") != tokenizer_sha256:
        raise ValueError(f"{path} was fine-tuned on tokenizer sha256 {str(art.get('tokenizer_sha256'))[:12]}..., "
                         f"not on this one ({tokenizer_sha256[:12]}...): rerun `mergevq finetune-recovery` "
                         "on this tokenizer")
    recovery = copy.deepcopy(tokenizer.recovery)
    recovery.load_state_dict(art["recovery"])
    decoder = tokenizer.decoder
    if art["decoder"] is not None:
        decoder = copy.deepcopy(tokenizer.decoder)
        decoder.load_state_dict(art["decoder"])
    return FinetunedRecovery(recovery, decoder, art["decoder"] is not None).eval()
