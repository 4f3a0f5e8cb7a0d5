"""RandAR on merged tokens: the parallel schedule, random orders, decoding against teacher forcing."""
import math

import pytest
import torch

from generator_fixtures import TINY, randomise_, tiny_generator  # noqa: F401
from mergevq.generator import build_generator
from mergevq.generator.gpt import Decoding
from mergevq.generator.randar import parallel_schedule

def tiny(**kw):
    return tiny_generator("randar-demo", **{"grid": 3, "seq_len": 9, **kw})


def batch(b=3, seed=1, n=9):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 64, (b, n), generator=g)
    labels = torch.randint(0, 5, (b,), generator=g)
    order = torch.rand(b, n, generator=g).argsort(1)
    return codes, labels, order


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------


def test_schedule_hand_values():
    assert parallel_schedule(16, 4) == [1, 4, 5, 6]  # cum 1, 5, 10, 16
    assert parallel_schedule(5, 2) == [1, 4]
    assert parallel_schedule(1, 1) == [1]
    with pytest.raises(ValueError, match="steps >= 2"):
        parallel_schedule(4, 1)


@pytest.mark.parametrize("n,steps", [(256, 88), (144, 64), (36, 8), (16, 16), (16, 40), (9, 2), (7, 3)])
def test_schedule_sums_to_n_in_min_steps_and_matches_formula(n, steps):
    counts = parallel_schedule(n, steps)
    assert sum(counts) == n and len(counts) == min(steps, n) and min(counts) >= 1
    cum = torch.tensor(counts).cumsum(0).tolist()
    assert cum[0] == 1
    for s in range(1, len(cum)):
        want = min(n, max(cum[s - 1] + 1, math.floor((1 - math.cos(math.pi / 2 * (s + 1) / steps)) * n + 1)))
        assert cum[s] == want


def test_every_slot_is_decoded_exactly_once(monkeypatch):
    model = tiny()
    seen = []
    original = Decoding.pick

    def spy(self, hidden, out_slots, *args, **kw):
        seen.append(out_slots.clone())
        return original(self, hidden, out_slots, *args, **kw)

    monkeypatch.setattr(Decoding, "pick", spy)
    _, labels, order = batch()
    model.generate(labels, order=order, steps=3, seeds=torch.arange(3))
    slots = torch.cat(seen, dim=1)  # (B, N) in decode order
    assert len(seen) == 3 and torch.equal(slots, order)
    assert torch.equal(slots.sort(1).values, torch.arange(9).expand(3, -1))


@pytest.mark.parametrize("use_cache", [True, False])
def test_one_token_per_step_equals_teacher_forcing_in_that_order(use_cache):
    model = tiny()
    codes, labels, order = batch()
    tf = model.teacher_forced_logits(codes, labels, order=order)
    out, logits = model.generate(labels, order=order, steps=9, force=codes, return_logits=True,
                                 use_cache=use_cache)
    assert torch.equal(out, codes)
    assert max_diff(tf, logits) < 1e-5


def test_linear_cfg_ramp_follows_share_decoded():
    model = tiny()
    codes, labels, order = batch()
    c = model.teacher_forced_logits(codes, labels, order=order)
    u = model.teacher_forced_logits(codes, torch.full_like(labels, model.null_class), order=order)
    _, logits = model.generate(labels, order=order, steps=9, force=codes, return_logits=True, cfg_scale=4.0)
    rank = order.argsort(1)  # decode index of each slot
    scale = (1.0 + 3.0 * rank / 9)[..., None]  # (B, N, 1)
    assert max_diff([ui + scale * (ci - ui) for ci, ui in zip(c, u)], logits) < 1e-5
    _, const = model.generate(labels, order=order, steps=9, force=codes, return_logits=True, cfg_scale=4.0,
                              cfg_schedule="constant")
    assert max_diff([ui + 4.0 * (ci - ui) for ci, ui in zip(c, u)], const) < 1e-5


def test_parallel_decoding_with_cache_equals_without():
    model = tiny()
    _, labels, order = batch()
    a, la = model.generate(labels, order=order, steps=3, seeds=torch.arange(3), cfg_scale=2.0, return_logits=True)
    b, lb = model.generate(labels, order=order, steps=3, seeds=torch.arange(3), cfg_scale=2.0, return_logits=True,
                           use_cache=False)
    assert torch.equal(a, b) and max_diff(la, lb) < 1e-5
    # the first query sees the full context: its logits equal teacher forcing; later ones in a
    # parallel step do not (they see other queries instead of tokens)
    tf = model.teacher_forced_logits(a, labels, order=order)
    first = order[:, 0]
    rows = torch.arange(3)
    assert (tf[0][rows, first] - la[0][rows, first]).abs().max() < 1e-5
    second = order[:, 1]
    assert (tf[0][rows, second] - la[0][rows, second]).abs().max() > 1e-4


def test_random_order_per_row_does_not_depend_on_batch():
    model = tiny()
    labels = torch.tensor([0, 1, 2, 3])
    seeds = torch.arange(20, 24)
    together = model.generate(labels, seeds=seeds, steps=4, cfg_scale=3.0)
    alone = torch.cat([model.generate(labels[i:i + 1], seeds=seeds[i:i + 1], steps=4, cfg_scale=3.0)
                       for i in range(4)])
    assert torch.equal(together, alone)


def test_order_matters_and_instructions_are_rotations():
    model = tiny()
    codes, labels, order = batch()
    a = model.teacher_forced_logits(codes, labels, order=order)
    b = model.teacher_forced_logits(codes, labels, order=order.flip(1))
    assert max_diff(a, b) > 1e-3
    pos = model.slot_positions(torch.arange(9)[None])
    ins = model.instructions(pos)[0].view(9, -1, 2)  # rotary pairs
    ref = model.pos_instruction.view(-1, 2)
    assert torch.allclose(ins.norm(dim=-1), ref.norm(dim=-1).expand(9, -1), atol=1e-6)
    assert (ins[1] - ins[2]).abs().max() > 1e-4


def test_loss_with_random_order_and_bad_inputs():
    model = tiny()
    codes, labels, order = batch()
    model.train()
    assert torch.isfinite(model.loss(codes, labels).loss)
    model.eval()
    with pytest.raises(ValueError, match="permutations"):
        model.teacher_forced_logits(codes, labels, order=torch.zeros_like(order))
    with pytest.raises(ValueError, match="grid must be"):
        build_generator("randar-demo", **{**TINY, "seq_len": 9, "grid": 4})
    with pytest.raises(ValueError, match="cfg_schedule"):
        model.generate(labels, cfg_schedule="cosine")


def test_randar_L_parameter_count():
    with torch.device("meta"):
        model = build_generator("randar-L")
    assert sum(p.numel() for p in model.parameters()) == 343_570_432 + 1024
