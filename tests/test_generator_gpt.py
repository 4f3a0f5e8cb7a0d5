"""LlamaGen GPT with a factorised vocabulary: cache equivalence, CFG, factorised joint, sampling."""
import dataclasses

import pytest
import torch

from generator_fixtures import TINY, randomise_, tiny_generator  # noqa: F401
from mergevq.files import torch_save
from mergevq.generator import (PRESETS, build_generator, default_bits_split, load_generator,
                               merge_codes, split_codes)
from mergevq.generator.layers import PREFIX, KVCache, rope_from_positions
from mergevq.generator.sample import draw, filter_logits, SamplingSettings


def tiny(**kw):
    return tiny_generator("llamagen-demo", **kw)


def batch(model, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    codes = torch.randint(0, 2 ** c.codebook_bits, (b, c.num_tokens), generator=g)
    labels = torch.randint(0, c.num_classes, (b,), generator=g)
    return codes, labels


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,split", [(18, (6, 12)), (10, (4, 6)), (6, (2, 4)), (2, (1, 1))])
def test_default_split_and_round_trip(bits, split):
    assert default_bits_split(bits) == split
    idx = torch.randint(0, 2 ** bits, (5, 7))
    parts = split_codes(idx, split)
    assert [int(p.max()) < 2 ** b for p, b in zip(parts, split)] == [True, True]
    assert torch.equal(merge_codes(parts, split), idx)
    # LSB first: sub-token 1 holds channels 0 .. split[0]-1
    assert torch.equal(parts[0], idx % 2 ** split[0])


def test_three_way_split_round_trip():
    idx = torch.arange(2 ** 9)
    assert torch.equal(merge_codes(split_codes(idx, (2, 3, 4)), (2, 3, 4)), idx)


def test_llamagen_L_parameter_count():
    with torch.device("meta"):
        model = build_generator("llamagen-L")
    c = model.config
    assert (c.n_layer, c.dim, c.n_head, c.ffn_hidden, c.bits_split, c.n_intra_layer) == (24, 1024, 16, 2816, (6, 12), 2)
    assert sum(p.numel() for p in model.parameters()) == 343_570_432  # Open-MAGVIT2's AR-L


def test_fresh_heads_are_zero():
    model = build_generator("llamagen-demo", **TINY)
    assert all(torch.count_nonzero(h.weight) == 0 for h in model.heads)
    assert model.cls_embedding.weight.shape[0] == TINY["num_classes"] + 1


@pytest.mark.parametrize("use_cache", [True, False])
def test_incremental_decoding_equals_teacher_forcing(use_cache):
    model = tiny()
    codes, labels = batch(model)
    tf = model.teacher_forced_logits(codes, labels)
    out, logits = model.generate(labels, force=codes, return_logits=True, use_cache=use_cache)
    assert torch.equal(out, codes)
    assert [t.shape for t in tf] == [(3, 16, 4), (3, 16, 16)]
    assert max_diff(tf, logits) < 1e-5


def test_cfg_forced_logits_are_guided_combination():
    model = tiny()
    codes, labels = batch(model)
    c = model.teacher_forced_logits(codes, labels)
    u = model.teacher_forced_logits(codes, torch.full_like(labels, model.null_class))
    _, logits = model.generate(labels, force=codes, return_logits=True, cfg_scale=2.5)
    assert max_diff([ui + 2.5 * (ci - ui) for ci, ui in zip(c, u)], logits) < 1e-5
    _, per_sub = model.generate(labels, force=codes, return_logits=True, cfg_scale=(1.5, 3.0))
    assert (per_sub[0] - (u[0] + 1.5 * (c[0] - u[0]))).abs().max() < 1e-5
    assert (per_sub[1] - (u[1] + 3.0 * (c[1] - u[1]))).abs().max() < 1e-5


def test_cfg_sampling_feeds_the_guided_subtoken_to_both_halves():
    model = tiny()
    _, labels = batch(model)
    codes, logits = model.generate(labels, cfg_scale=3.0, return_logits=True, seeds=torch.arange(3))
    # replaying the sampled codes teacher-forced on both halves gives the same guided logits:
    # the null half saw the guided sub-token 1 and the guided codes, not samples of its own
    c = model.teacher_forced_logits(codes, labels)
    u = model.teacher_forced_logits(codes, torch.full_like(labels, model.null_class))
    assert max_diff([ui + 3.0 * (ci - ui) for ci, ui in zip(c, u)], logits) < 1e-5


def test_dense_joint_is_normalised_and_matches_factorised_loss():
    model = tiny()
    codes, labels = batch(model)
    split = model.config.bits_split
    hidden = model.hidden_states(codes, labels)
    l1 = model.intra_logits(hidden, codes)[0].log_softmax(-1)  # (B, N, 4)
    joint = []
    for s1 in range(2 ** split[0]):  # p(s2 | s1) for every value of sub-token 1
        alt = merge_codes((torch.full_like(codes, s1), split_codes(codes, split)[1]), split)
        l2 = model.intra_logits(hidden, alt)[1].log_softmax(-1)  # (B, N, 16)
        joint.append(l1[..., s1:s1 + 1] + l2)
    joint = torch.stack(joint, dim=-2).flatten(-2)  # (B, N, 4 * 16): index s1 * 16 + s2
    assert torch.allclose(joint.logsumexp(-1), torch.zeros(()), atol=1e-5)
    s1, s2 = split_codes(codes, split)
    ce_dense = -joint.gather(-1, (s1 * 2 ** split[1] + s2)[..., None]).mean()
    assert abs(ce_dense.item() - model.loss(codes, labels).loss.item()) < 1e-5


def test_batch_size_does_not_change_samples():
    model = tiny()
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    seeds = torch.arange(100, 107)
    together = model.generate(labels, seeds=seeds, cfg_scale=2.0, temperature=1.0, top_p=0.9)
    alone = torch.cat([model.generate(labels[i:i + 1], seeds=seeds[i:i + 1], cfg_scale=2.0, top_p=0.9)
                       for i in range(7)])
    assert torch.equal(together, alone)


def test_seeded_sampling_is_reproducible():
    model = tiny()
    labels = torch.tensor([1, 2, 3])
    a = model.generate(labels, seeds=torch.tensor([5, 6, 7]))
    b = model.generate(labels, seeds=torch.tensor([5, 6, 7]))
    c = model.generate(labels, seeds=torch.tensor([8, 9, 10]))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = model.generate(labels)
    torch.manual_seed(3)
    assert torch.equal(d, model.generate(labels))


def test_class_dropout_only_in_training():
    model = tiny(class_dropout=1.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    codes, labels = batch(model)
    null = torch.full_like(labels, model.null_class)
    ev = model.loss(codes, labels).loss
    assert abs(ev.item() - model.loss(codes, null).loss.item()) > 1e-4
    model.train()
    assert abs(model.loss(codes, labels).loss.item() - model.eval().loss(codes, null).loss.item()) < 1e-6


def test_loss_is_sum_of_subtoken_ces_and_smoothing_changes_it():
    model = tiny()
    codes, labels = batch(model)
    out = model.loss(codes, labels)
    assert len(out.per_subtoken) == 2
    assert torch.allclose(out.loss, out.per_subtoken[0] + out.per_subtoken[1])
    assert abs(model.loss(codes, labels, label_smoothing=0.1).loss.item() - out.loss.item()) > 1e-4
    out.loss.backward()
    assert all(p.grad is not None for p in model.heads.parameters())


def test_rope_rows_cols_and_zeroed_prefix():
    pos = torch.tensor([[[PREFIX, PREFIX], [2, 3], [2, 1], [0, 3]]])
    rope = rope_from_positions(pos, head_dim=16)
    assert rope.cos.shape == (1, 4, 8)
    assert torch.equal(rope.cos[0, 0], torch.zeros(8)) and torch.equal(rope.sin[0, 0], torch.zeros(8))
    # same row: the row half agrees, the column half differs; same column: the reverse
    assert torch.equal(rope.cos[0, 1, :4], rope.cos[0, 2, :4]) and not torch.equal(rope.cos[0, 1, 4:], rope.cos[0, 2, 4:])
    assert torch.equal(rope.cos[0, 1, 4:], rope.cos[0, 3, 4:]) and not torch.equal(rope.cos[0, 1, :4], rope.cos[0, 3, :4])


def test_kv_cache_writes_at_per_sample_slots_and_grows():
    cache = KVCache(1, 2, 1, 3, 2, torch.float32, "cpu")
    k = torch.arange(8.).view(2, 1, 2, 2)  # (B, H, T, hd)
    cache.write(0, torch.tensor([[0, 2], [1, 0]]), k, -k)
    assert torch.equal(cache.k[0][0, 0, 2], k[0, 0, 1]) and torch.equal(cache.k[0][1, 0, 0], k[1, 0, 1])
    cache.grow(2)
    assert cache.size == 5 and torch.equal(cache.v[0][1, 0, 1], -k[1, 0, 0])


def test_filtering_and_draw():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert not torch.isinf(filter_logits(logits, top_k=2)[0, :2]).any()
    p = logits.softmax(-1)[0]
    kept = torch.isfinite(filter_logits(logits, top_p=float(p[0]) + 1e-3))[0]
    assert kept.tolist() == [True, True, False, False]
    u = torch.linspace(0, 0.999, 50)
    picks = draw(logits.expand(50, -1), u, SamplingSettings(top_k=2))
    assert set(picks.tolist()) <= {0, 1}
    assert draw(logits, torch.tensor([0.99]), SamplingSettings(temperature=0)).item() == 0


def test_bad_inputs_raise():
    model = tiny()
    codes, labels = batch(model)
    with pytest.raises(ValueError, match="codes must be in"):
        model.teacher_forced_logits(codes + 64, labels)
    with pytest.raises(ValueError, match="labels must be in"):
        model.teacher_forced_logits(codes, labels + 10)
    with pytest.raises(ValueError, match="codes must be"):
        model.teacher_forced_logits(codes[:, :5], labels)
    with pytest.raises(ValueError, match="seeds"):
        model.generate(labels, seeds=torch.arange(2))
    with pytest.raises(ValueError, match="unknown generator preset"):
        build_generator("llamagen-XXL")
    with pytest.raises(TypeError, match="unknown GPTConfig field"):
        build_generator("llamagen-demo", width=3)
    with pytest.raises(ValueError, match="sub_token_bits"):
        build_generator("llamagen-demo", sub_token_bits=(3, 3))


def test_load_generator_round_trip(tmp_path):
    model = tiny()
    torch_save({"generator_config": dataclasses.asdict(model.config), "ema": model.state_dict()},
               tmp_path / "model.pt")
    loaded, _ = load_generator(tmp_path / "model.pt")
    assert loaded.config == model.config and not loaded.training
    codes, labels = batch(model)
    assert max_diff(loaded.teacher_forced_logits(codes, labels), model.teacher_forced_logits(codes, labels)) == 0


def test_presets_build():
    assert {"llamagen-L", "llamagen-demo", "mergear-L", "mergear-demo", "randar-L", "randar-demo"} <= set(PRESETS)
