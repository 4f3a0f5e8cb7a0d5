"""MergeAR: the Eq. (16) mask, the pruned KV cache against the masked full forward, cache growth."""
import pytest
import torch

from generator_fixtures import TINY, randomise_, tiny_generator  # noqa: F401
from mergevq.generator import build_generator
from mergevq.generator.mergear import (PREFIX_LEN, keep_by_code, keep_by_owner, keep_rule_disagreement,
                                       mergear_mask)

def tiny(**kw):
    return tiny_generator("mergear-demo", **kw)


def merged_batch():
    """4 sequences of L = 16 with 16, 9, 5 and 4 groups; sample 2 has two groups sharing a code."""
    g = torch.Generator().manual_seed(3)
    owners, codes = [], []
    for groups in (16, 9, 5, 4):
        owner = torch.cat([torch.arange(groups), torch.randint(0, groups, (16 - groups,), generator=g)])
        owner = owner[torch.randperm(16, generator=g)]
        # canonical: first occurrences in order 0..K-1
        order = {int(o): i for i, o in enumerate(dict.fromkeys(owner.tolist()))}
        owner = torch.tensor([order[int(o)] for o in owner])
        group_codes = torch.randperm(64, generator=g)[:groups]
        if groups == 5:
            group_codes[3] = group_codes[1]  # a code collision across groups
        owners.append(owner)
        codes.append(group_codes[owner])
    return torch.stack(codes), torch.stack(owners), torch.tensor([16, 9, 5, 4])


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------


def test_eq16_mask_hand_checked():
    keep = keep_by_owner(torch.tensor([[0, 1, 0, 2, 1]]))
    assert keep[0].tolist() == [True, True, False, True, False]
    mask = mergear_mask(keep, prefix=2)  # (1, 7, 7)
    assert mask.shape == (1, 7, 7)
    assert torch.nonzero(mask[0, 5]).flatten().tolist() == [0, 1, 2, 3, 5]  # query at x_3
    assert torch.nonzero(mask[0, 4]).flatten().tolist() == [0, 1, 2, 3, 4]  # a duplicate sees itself
    for q in range(7):
        for k in range(7):
            want = k <= q and (k < 2 or bool(keep[0, k - 2]) or k == q)
            assert bool(mask[0, q, k]) == want


def test_code_rule_and_owner_rule_differ_only_on_collisions():
    codes, owner, _ = merged_batch()
    by_code, by_owner = keep_by_code(codes), keep_by_owner(owner)
    assert by_owner.sum(1).tolist() == [16, 9, 5, 4]
    assert by_code.sum(1).tolist() == [16, 9, 4, 4]  # sample 2: groups 1 and 3 share a code
    dis = keep_rule_disagreement(codes, owner)
    assert dis[2].item() == pytest.approx(1 / 16) and dis[[0, 1, 3]].abs().sum() == 0


@pytest.mark.parametrize("mode", [dict(prune_cache=True), dict(prune_cache=False), dict(use_cache=False)])
@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_decoding_equals_masked_teacher_forcing(mode, cfg):
    model = tiny()
    codes, _, kept = merged_batch()
    labels = torch.tensor([0, 1, 2, 3])
    c = model.teacher_forced_logits(codes, labels, kept=kept)
    u = model.teacher_forced_logits(codes, torch.full_like(labels, model.null_class), kept=kept)
    want = [ui + cfg * (ci - ui) for ci, ui in zip(c, u)]
    out = model.generate_with_stats(labels, kept=kept, force=codes, return_logits=True, cfg_scale=cfg, **mode)
    assert torch.equal(out.codes, codes)
    assert max_diff(want, out.logits) < 1e-5


def test_pruned_cache_length_is_prefix_plus_running_kept_count():
    model = tiny()
    codes, _, kept = merged_batch()
    stats = model.generate_with_stats(torch.tensor([0, 1, 2, 3]), kept=kept, force=codes).stats
    want = PREFIX_LEN + keep_by_code(codes).long().cumsum(1)[:, :-1]  # after inputs x_0 .. x_{L-2}
    assert torch.equal(stats.cache_len, want)
    assert stats.growths == 0 and stats.rows_over_k == 0 and stats.capacity == PREFIX_LEN + 16 + 1  # + the working slot
    full = model.generate_with_stats(torch.tensor([0, 1, 2, 3]), kept=kept, force=codes, prune_cache=False).stats
    assert torch.equal(full.cache_len, PREFIX_LEN + torch.arange(1, 16).expand(4, -1))


def test_keep_everything_is_a_different_model():
    model = tiny()
    codes, _, kept = merged_batch()
    labels = torch.tensor([0, 1, 2, 3])
    eq16 = model.teacher_forced_logits(codes, labels, kept=kept)
    causal = model.teacher_forced_logits(codes, labels, kept=kept, keep=torch.ones_like(codes, dtype=torch.bool))
    diff = (eq16[0] - causal[0]).abs().amax(dim=(1, 2))
    assert diff[0] < 1e-6  # no duplicates: the same attention
    assert (diff[1:] > 1e-3).all()


def test_merge_instruction_conditions_on_k():
    model = tiny()
    codes, _, _ = merged_batch()
    labels = torch.tensor([0, 1, 2, 3])
    a = model.teacher_forced_logits(codes, labels, kept=4)
    b = model.teacher_forced_logits(codes, labels, kept=12)
    assert max_diff(a, b) > 1e-3


def test_pruning_on_or_off_gives_identical_samples():
    model = tiny(codebook_bits=4)  # 16 codes over 16 positions: duplicates certain
    labels = torch.tensor([0, 1, 2, 3, 4])
    seeds = torch.arange(10, 15)
    pruned = model.generate_with_stats(labels, kept=8, seeds=seeds, cfg_scale=1.5)
    full = model.generate(labels, kept=8, seeds=seeds, cfg_scale=1.5, prune_cache=False)
    nocache = model.generate(labels, kept=8, seeds=seeds, cfg_scale=1.5, use_cache=False)
    assert torch.equal(pruned.codes, full) and torch.equal(pruned.codes, nocache)
    assert (pruned.stats.kept < 15).all()  # pruning happened


def test_more_than_k_distinct_codes_grows_the_cache():
    model = tiny()
    codes = torch.stack([torch.arange(16), torch.arange(16) % 3])  # 16 distinct vs 3 distinct
    labels = torch.tensor([1, 2])
    out = model.generate_with_stats(labels, kept=3, force=codes, return_logits=True)
    assert out.stats.growths >= 1 and out.stats.rows_over_k == 1
    assert out.stats.capacity >= PREFIX_LEN + 15 and out.stats.kept.tolist() == [15, 3]
    assert max_diff(model.teacher_forced_logits(codes, labels, kept=3), out.logits) < 1e-5


def test_mergear_L_parameter_count():
    with torch.device("meta"):
        model = build_generator("mergear-L")
    assert sum(p.numel() for p in model.parameters()) == 343_570_432 + 256 * 1024


def test_loss_and_bad_kept():
    model = tiny()
    codes, _, kept = merged_batch()
    labels = torch.tensor([0, 1, 2, 3])
    out = model.loss(codes, labels, kept=kept)
    assert torch.isfinite(out.loss) and len(out.per_subtoken) == 2
    with pytest.raises(ValueError, match="kept="):
        model.teacher_forced_logits(codes, labels)
    with pytest.raises(ValueError, match="kept must be"):
        model.teacher_forced_logits(codes, labels, kept=17)
    with pytest.raises(ValueError, match="kept must be"):
        model.generate(labels, kept=torch.tensor([1, 2]))
