"""Token recovery (Eq. 13-14) and the learned Source Recovery model (Eq. 9-11, Table A2).

Token recovery copies every kept token back to the positions it covers: Z_L = S^T Z_Kq.
Source Recovery predicts S from the K quantised tokens alone (inference, RandAR generation): a
2-layer Transformer decoder (width 384, 8 heads, FFN 1536) in which L learnable queries, one per
position, self-attend and cross-attend to the K tokens (App. A.1: "similar to Maskformer"); the
logits of position l over the K tokens are the scaled dot products of the projected query l with
the projected tokens (Eq. 10). The K tokens get no positional embedding: they are a set, whose
order carries no information the model could use at inference.

Shapes: B batch, K kept tokens, L positions, D code channels (bits), d recovery width.
"""
from __future__ import annotations

import math

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
        """quantized (B, K, D) -> S_hat (B, K, L) one-hot per position (a valid partition)."""
        return source_from_logits(self(quantized))
