"""Invariants of token merging, proportional attention, ToMeBlock and merge schedules (tiny CPU)."""
import pytest
import torch
import torch.nn.functional as F

from mergevq.tokenizer.tome import (
    SCHEDULE_KINDS, MergeResult, ToMeBlock, merge_schedule, merge_tokens, proportional_attention,
)


def check_merge_invariants(res: MergeResult, B: int, n_out: int, L: int):
    assert res.x.shape[:2] == (B, n_out)
    assert res.size.shape == (B, n_out, 1)
    assert res.source.shape == (B, n_out, L)
    assert torch.all((res.source == 0) | (res.source == 1))
    assert torch.all(res.source.sum(dim=1) == 1)  # every original token lives in exactly one row
    assert torch.allclose(res.size.sum(dim=1), torch.full((B, 1), float(L)))
    assert torch.equal(res.size[..., 0], res.source.sum(dim=-1))


def test_merge_invariants_and_weighted_mean_chained():
    torch.manual_seed(0)
    B, L, C = 3, 17, 8
    x0 = torch.randn(B, L, C)
    one = merge_tokens(x0, torch.randn(B, L, 5), r=5)
    check_merge_invariants(one, B, L - 5, L)
    # merged features are the mean of the original features they cover (one merge)
    assert torch.allclose(one.x, one.source @ x0 / one.size, atol=1e-5)
    two = merge_tokens(one.x, torch.randn(B, L - 5, 5), r=4, size=one.size, source=one.source)
    check_merge_invariants(two, B, L - 9, L)
    # ... and still after a second, size-weighted merge
    assert torch.allclose(two.x, two.source @ x0 / two.size, atol=1e-5)


def test_per_sample_matches_differ():
    torch.manual_seed(1)
    B, L = 4, 12
    res = merge_tokens(torch.randn(B, L, 6), torch.randn(B, L, 6), r=4)
    check_merge_invariants(res, B, L - 4, L)
    assert len({tuple(s.flatten().tolist()) for s in res.source}) > 1


def test_exact_duplicates_are_merged_and_order_documented():
    torch.manual_seed(2)
    B, pairs, N, C = 2, 3, 10, 16
    x = torch.randn(B, N, C)
    x[:, 1:2 * pairs:2] = x[:, 0:2 * pairs:2]  # tokens (0,1), (2,3), (4,5) are identical
    res = merge_tokens(x, x, r=pairs)
    n_a = (N + 1) // 2
    # output = unmerged A tokens (6, 8) in order, then all B tokens (1, 3, 5, 7, 9)
    assert torch.allclose(res.x, torch.cat([x[:, 6:N:2], x[:, 1::2]], dim=1))
    expected_size = torch.tensor([1.0] * (n_a - pairs) + [2.0] * pairs + [1.0] * (N // 2 - pairs))
    assert torch.equal(res.size[..., 0], expected_size.expand(B, -1))


def test_r_capped_at_half():
    x = torch.randn(2, 9, 4)
    res = merge_tokens(x, x, r=100)
    check_merge_invariants(res, 2, 9 - 4, 9)
    same = merge_tokens(x, x, r=0)
    assert same.x is x and torch.equal(same.source[0], torch.eye(9))


def test_proportional_attention_equals_attention_over_duplicates():
    torch.manual_seed(3)
    B, h, M, d = 2, 3, 5, 8
    k, v = torch.randn(B, h, M, d), torch.randn(B, h, M, d)
    counts = torch.tensor([1, 3, 2, 1, 4])
    q = torch.randn(B, h, 7, d)
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(counts, dim=2),
                                          v.repeat_interleave(counts, dim=2))
    size = counts.float().expand(B, M)[..., None]
    assert torch.allclose(proportional_attention(q, k, v, size), full, atol=1e-5)
    assert torch.allclose(proportional_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_merge_then_proportional_attention_matches_unmerged():
    torch.manual_seed(4)
    B, h, N, d = 2, 2, 8, 4
    kv = torch.randn(B, N, 2 * h * d)
    kv[:, 1:6:2] = kv[:, 0:6:2]  # three duplicated pairs
    res = merge_tokens(kv, kv, r=3)
    q = torch.randn(B, h, 5, d)

    def split(t):  # (B, n, 2hd) -> k, v (B, h, n, d)
        return t.reshape(B, t.shape[1], 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)

    k_full, v_full = split(kv)
    k_m, v_m = split(res.x)
    expected = F.scaled_dot_product_attention(q, k_full, v_full)
    assert torch.allclose(proportional_attention(q, k_m, v_m, res.size), expected, atol=1e-5)


def test_block_matches_timm_block_without_merging():
    from timm.models.vision_transformer import Block

    torch.manual_seed(5)
    ref = Block(32, 4, mlp_ratio=4.0, qkv_bias=True, init_values=1e-5).eval()
    for p in ref.parameters():  # make LayerScale non-trivial so the check has teeth
        p.data.normal_(0, 0.2)
    blk = ToMeBlock(32, 4).eval()
    assert set(blk.state_dict()) == set(ref.state_dict())
    blk.load_state_dict(ref.state_dict())
    x = torch.randn(2, 10, 32)
    out = blk(x, r=0)
    assert torch.allclose(out.x, ref(x), atol=1e-5)
    assert torch.allclose(blk(x, r=0, size=torch.ones(2, 10, 1)).x, ref(x), atol=1e-5)


def test_block_keeps_prefix_and_gradients_flow():
    torch.manual_seed(6)
    B, L, C, K = 2, 16, 32, 9
    blk = ToMeBlock(C, 4, layer_scale_init=None)
    cls = torch.randn(B, 1, C)
    x = torch.cat([cls, torch.randn(B, L, C)], dim=1).requires_grad_(True)
    size = source = None
    h = x
    for r in merge_schedule(L, K, 3):
        h, size, source = blk(h, r, size, source, num_prefix_tokens=1)
    assert h.shape == (B, K + 1, C)
    check_merge_invariants(MergeResult(h[:, 1:], size, source), B, K, L)
    # the cls token never enters the merge: its output is the block applied without merging
    h1, _, _ = blk(x, 4, num_prefix_tokens=1)
    h0, _, _ = blk(x, 0, num_prefix_tokens=1)
    assert torch.allclose(h1[:, 0], h0[:, 0], atol=1e-6)
    h.sum().backward()
    assert x.grad is not None and x.grad[:, 1:].abs().sum() > 0


@pytest.mark.parametrize("num_tokens,kept,expected", [
    (256, 144, [12, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 5]),
    (1024, 256, [101, 90, 84, 78, 72, 66, 61, 55, 49, 43, 37, 32]),
    (256, 64, [29, 22, 21, 19, 18, 16, 15, 13, 12, 10, 9, 8]),
])
def test_tome_schedule_reproduces_authors(num_tokens, kept, expected):
    assert merge_schedule(num_tokens, kept, 12, "tome") == expected


CASES = ([(1024, k, 12) for k in (1024, 576, 400, 256, 196, 144, 100, 64)]
         + [(256, k, 12) for k in (256, 196, 144, 100, 64, 36)]
         + [(256, k, 4) for k in (256, 196, 144, 100, 64, 36)]
         + [(64, k, 4) for k in (64, 49, 36, 25, 16, 9)]
         + [(16, 9, 12), (16, 1, 4), (5, 2, 2)])


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_schedules_reach_every_kept_count(kind):
    for num_tokens, kept, depth in CASES:
        sched = merge_schedule(num_tokens, kept, depth, kind)
        assert len(sched) == depth and sum(sched) == num_tokens - kept, (num_tokens, kept, sched)
        n = num_tokens
        for r in sched:
            assert 0 <= r <= n // 2, (num_tokens, kept, kind, sched)
            n -= r


def test_schedule_shapes():
    assert merge_schedule(256, 64, 4, "constant") == [48] * 4
    lin = merge_schedule(1024, 256, 12, "linear")
    sq = merge_schedule(1024, 256, 12, "square")
    assert lin == sorted(lin, reverse=True) and sq == sorted(sq, reverse=True)
    assert sq[0] > lin[0] and sq[-1] < lin[-1]


@pytest.mark.parametrize("args", [(16, 17, 4), (16, 0, 4), (1024, 9, 4), (16, 8, 0), (16, 8, 4, "cubic")])
def test_schedule_infeasible_raises(args):
    with pytest.raises(ValueError, match="merge_schedule"):
        merge_schedule(*args)
