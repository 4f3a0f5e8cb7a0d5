"""RandAR on merged tokens (Sec. 4.2, Eq. 17): random-order AR over the K merged tokens.

Decided readings (README "Decisions"):
* Sequence [class] + interleave(P_{o_1}, x_{o_1}, ..., P_{o_N}, x_{o_N}) over the N = K merged
  tokens in order o; the logits are read at the position-instruction slots P (Eq. 17). The last
  token x_{o_N} is not an input (nothing reads its output).
* One learned instruction vector (dim d), viewed as (heads, head_dim) and rotated by the target
  slot's 2D RoPE, as RandAR does; the instruction and its token then carry that slot's RoPE in
  attention too.
* A merged token's "position" is its slot n in the canonical order (sorted by first covered
  position, as the encoder emits them), laid out on a grid x grid raster with grid =
  ceil(sqrt(K)) (12 x 12 for K = 144). At inference no S exists, so the positions the generator
  may sample are known in advance; Source Recovery predicts S_hat from the K codes in slot order.
* Training: a random permutation per sample (`order=`; drawn from the global RNG when omitted).
  Only the image-token embeddings get token dropout (RandAR), not the class or instructions.
* Decoding: RandAR's parallel schedule, cum[0] = 1, cum[s] = min(N, max(cum[s-1] + 1,
  floor((1 - cos(pi/2 (s+1)/T)) N + 1))), min(T, N) steps. The queries of one step are packed
  after the last decoded token (RandAR's KV-cache layout); the next step re-feeds the decoded
  tokens with their instructions, overwriting the stale query entries. With T = N every step has
  one query and decoding reproduces teacher forcing exactly. CFG scale ramps linearly with the
  share of tokens already decoded: s = start + (end - start) * done / N (RandAR: 1 -> end).
  Table A2's "Arccos mask schedule" is a masked-modelling term that applies to neither AR.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from mergevq.generator.gpt import Decoding, FactorisedGPT, GPTConfig, eval_mode
from mergevq.generator.layers import (CacheStep, apply_rope, grid_positions, prefix_positions,
                                      rope_from_positions)


def parallel_schedule(n: int, steps: int) -> list[int]:
    """Tokens decoded per step (RandAR): sums to n in min(steps, n) steps. steps >= 2 unless n == 1."""
    if n < 1:
        raise ValueError(f"need at least one token, got n={n}")
    if steps < 2 and n > 1:
        raise ValueError(f"RandAR's schedule needs steps >= 2 for n = {n} tokens, got {steps}")
    cum = [1]
    for s in range(1, min(steps, n)):
        target = math.floor((1 - math.cos(math.pi / 2 * (s + 1) / steps)) * n + 1)
        cum.append(min(n, max(cum[-1] + 1, target)))
    return [c - p for c, p in zip(cum, [0] + cum[:-1])]


def random_orders(batch: int, n: int, uniforms: Tensor | None = None, device=None) -> Tensor:
    """(batch, n) random permutations: argsort of uniforms (B, n), or of global-RNG draws."""
    if uniforms is None:
        uniforms = torch.rand(batch, n, device=device)
    return uniforms.argsort(dim=1)


class RandAR(FactorisedGPT):
    """LlamaGen + one position-instruction vector; random order; parallel decoding."""

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        n = config.num_tokens
        if config.grid != math.isqrt(n - 1) + 1:
            raise ValueError(f"RandAR lays its {n} slots on a ceil(sqrt(K)) grid: grid must be "
                             f"{math.isqrt(n - 1) + 1}, got {config.grid} "
                             "(set seq_len=K, grid=ceil(sqrt(K)))")
        self.pos_instruction = nn.Parameter(torch.empty(config.dim))
        nn.init.normal_(self.pos_instruction, 0.0, config.init_std)

    def slot_positions(self, order: Tensor) -> Tensor:
        """(B, n) slot indices -> (B, n, 2) RoPE positions on the grid."""
        return grid_positions(order, self.config.grid)

    def instructions(self, pos: Tensor) -> Tensor:
        """The instruction vector rotated by each target's 2D RoPE. pos (B, n, 2) -> (B, n, dim)."""
        c = self.config
        b, n, _ = pos.shape
        rope = rope_from_positions(pos, c.dim // c.n_head, c.rope_base)
        vec = self.pos_instruction.view(1, 1, c.n_head, -1).expand(b, n, -1, -1)  # (B, n, H, hd)
        return apply_rope(vec, rope).flatten(2)

    def _check_order(self, order: Tensor, b: int) -> None:
        n = self.config.num_tokens
        if order.shape != (b, n) or not torch.equal(order.sort(1).values,
                                                    torch.arange(n, device=order.device).expand(b, -1)):
            raise ValueError(f"order must be ({b}, {n}) permutations of the slots 0..{n - 1}")

    def interleaved(self, tokens: Tensor, order: Tensor, start: int, stop: int,
                    queries: int) -> tuple[Tensor, Tensor]:
        """Inputs [x_{o_start}, P_{o_start+1}, x_{o_start+1}, ..., P_{o_stop-1}, x_{o_stop-1},
        P_{o_stop}, ..., P_{o_stop+queries-1}] with their RoPE positions.

        tokens: (B, stop - start, dim) embeddings of x_{o_start..stop-1} (decode order);
        order: (B, N). Returns (B, 2 (stop - start) - 1 + queries, dim) and (B, same, 2).
        """
        pos = self.slot_positions(order[:, start:stop + queries])  # (B, stop - start + q, 2)
        ins = self.instructions(pos)
        m = stop - start
        pairs = torch.stack([ins[:, 1:m], tokens[:, 1:]], dim=2).flatten(1, 2)  # (B, 2 (m-1), dim)
        pair_pos = torch.stack([pos[:, 1:m], pos[:, 1:m]], dim=2).flatten(1, 2)
        x = torch.cat([tokens[:, :1], pairs, ins[:, m:]], dim=1)
        return x, torch.cat([pos[:, :1], pair_pos, pos[:, m:]], dim=1)

    def hidden_states(self, codes: Tensor, labels: Tensor, order: Tensor | None = None) -> Tensor:
        """Backbone outputs at the instruction slots, returned in SLOT order (B, N, dim)."""
        self._check_codes(codes, labels)
        b, n = codes.shape
        order = random_orders(b, n, device=codes.device) if order is None else order.to(codes.device)
        self._check_order(order, b)
        first = self.slot_positions(order[:, :1])  # (B, 1, 2)
        head = torch.cat([self.embed_labels(labels), self.instructions(first)], dim=1)  # [class, P_{o_1}]
        head_pos = torch.cat([prefix_positions(b, 1, codes.device), first], dim=1)
        x = [head, head_pos]
        if n > 1:
            toks = self.tok_dropout(self.embed_codes(codes.gather(1, order[:, :-1])))  # (B, N-1, dim)
            rest, rest_pos = self.interleaved(toks, order, 0, n - 1, 1)
            x = [torch.cat([head, rest], dim=1), torch.cat([head_pos, rest_pos], dim=1)]
        h = self.run_backbone(*x)[:, 1::2]  # (B, N, dim) at P_{o_1..N}, decode order
        return torch.zeros_like(h).scatter(1, order[..., None].expand_as(h), h)

    @torch.no_grad()
    def generate(self, labels: Tensor, *, cfg_scale=1.0, temperature=1.0, top_k=None, top_p=None,
                 seeds=None, force=None, return_logits=False, use_cache=True, order: Tensor | None = None,
                 steps: int | None = None, cfg_schedule: str = "linear", cfg_start: float = 1.0):
        """Parallel random-order decoding; codes and logits come back in SLOT order (B, N).

        order: (B, N) decoding order (default: a random permutation per row from the row's seed);
        steps: T (default N: one token per step); cfg_schedule "linear" ramps the scale from
        cfg_start to cfg_scale with the share of tokens decoded, "constant" keeps cfg_scale.
        """
        n, dev = self.config.num_tokens, labels.device
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        ramp = cfg_schedule == "linear"
        dec = Decoding(self, labels, n, cfg_scale, temperature, top_k, top_p, seeds, force,
                       return_logits, always_guided=ramp and cfg_start != 1.0, extra_uniforms=n)
        r, b = dec.rows, dec.batch
        order = random_orders(b, n, dec.extra) if order is None else order.to(dev)
        self._check_order(order, b)
        order_r = dec.expand(order)
        ends = [s.cfg_scale for s in dec.settings]
        cache = self.new_cache(r, 2 * n) if use_cache else None
        done_emb = torch.zeros(r, 0, self.config.dim, device=dev)  # embeddings of decoded x, decode order
        head_pos = torch.cat([prefix_positions(r, 1, dev), self.slot_positions(order_r[:, :1])], dim=1)
        head = torch.cat([self.embed_labels(dec.model_labels), self.instructions(head_pos[:, 1:])], dim=1)
        start = 0  # decode index of the first token fed at this step (cached path)
        with eval_mode(self):
            for s, q in enumerate(parallel_schedule(n, steps or n)):
                stop = done_emb.shape[1]  # tokens decoded so far
                if stop == 0:  # [class, P_{o_1} .. P_{o_q}]
                    q_pos = self.slot_positions(order_r[:, :q])  # (R, q, 2)
                    x = torch.cat([head[:, :1], self.instructions(q_pos)], dim=1)
                    pos = torch.cat([head_pos[:, :1], q_pos], dim=1)
                    first_slot = 0
                elif cache is None:  # the whole sequence so far, then the queries
                    rest, rest_pos = self.interleaved(done_emb, order_r, 0, stop, q)
                    x, pos = torch.cat([head, rest], dim=1), torch.cat([head_pos, rest_pos], dim=1)
                    first_slot = 0
                else:  # re-feed this round's tokens (overwriting stale queries), then the queries
                    x, pos = self.interleaved(done_emb[:, start:], order_r, start, stop, q)
                    first_slot = 2 + 2 * start
                t = x.shape[1]
                slots = torch.arange(first_slot, first_slot + t, device=dev)  # (T,) cache slots
                mask = (torch.arange(first_slot + t, device=dev)[None, :] <= slots[:, None]).expand(r, -1, -1)
                step = None if cache is None else CacheStep(cache, slots.expand(r, -1), first_slot + t)
                h = self.run_backbone(x, pos, mask if cache is not None else None, step)[:, -q:]
                share = stop / n  # RandAR: the scale follows the share already decoded
                scales = [cfg_start + (e - cfg_start) * share if ramp else e for e in ends]
                code = dec.pick(h, order[:, stop:stop + q], torch.arange(stop, stop + q, device=dev), scales)
                done_emb = torch.cat([done_emb, self.embed_codes(dec.expand(code))], dim=1)
                start = stop
        return dec.result()
