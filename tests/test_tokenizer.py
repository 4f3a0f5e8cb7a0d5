"""MergeVQ tokenizer: token recovery, Source Recovery, presets, gradient routing, DINOv2 init."""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from mergevq.tokenizer import (PRESETS, SourceRecovery, TokenizerConfig, build_tokenizer,
                               init_from_dinov2, source_from_logits, source_recovery_loss,
                               token_recovery, tokenizer_config)
from mergevq.tokenizer.encoder import uniform_element_selection
from mergevq.tokenizer.recovery import predict_source

DEMOS = ("G-demo", "G+R-demo", "R-demo")
PAPER = ("G", "G+R", "R")
# Table A1: #Param. of Encoder / Decoder (millions)
TABLE_A1 = {"G": (62.3, 82.8), "G+R": (62.7, 83.4), "R": (86.6, 83.4)}


def random_partition(B: int, K: int, L: int, generator: torch.Generator) -> torch.Tensor:
    """(B, K, L) binary: every position owned by exactly one of K tokens, every token non-empty."""
    source = torch.zeros(B, K, L)
    for b in range(B):
        owner = torch.cat([torch.arange(K), torch.randint(0, K, (L - K,), generator=generator)])
        owner = owner[torch.randperm(L, generator=generator)]
        source[b, owner, torch.arange(L)] = 1.0
    return source


def is_partition(source: torch.Tensor) -> bool:
    binary = bool(((source == 0) | (source == 1)).all())
    return binary and bool((source.sum(dim=1) == 1).all())


@pytest.fixture
def meta_autocast(monkeypatch):
    """lfq.py guards its fp32 math with torch.autocast(device_type=z.device.type, enabled=False),
    which raises 'unsupported scalarType' for device_type='meta'; on meta there is nothing to
    cast, so the guard becomes a no-op there (other devices are untouched)."""
    real = torch.autocast

    def autocast(device_type, *args, **kwargs):
        if device_type == "meta":
            return contextlib.nullcontext()
        return real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)


# ---------------------------------------------------------------------------------------------
# Token recovery and Source Recovery


def test_token_recovery_equals_loop():
    g = torch.Generator().manual_seed(0)
    B, K, L, D = 3, 5, 17, 4
    quantized = torch.randn(B, K, D, generator=g)
    source = random_partition(B, K, L, g)
    expected = torch.zeros(B, L, D)
    for b in range(B):
        for l in range(L):
            for i in range(K):
                expected[b, l] += quantized[b, i] * source[b, i, l]  # Eq. (14)
    got = token_recovery(quantized, source)
    assert got.shape == (B, L, D)
    assert torch.equal(got, expected)


def test_predicted_source_is_partition():
    torch.manual_seed(0)
    model = SourceRecovery(num_tokens=20, code_dim=6, dim=32, depth=2, num_heads=4, ffn_dim=64)
    quantized = torch.randn(3, 7, 6).sign()
    predicted = model.predict(quantized)
    assert predicted.shape == (3, 7, 20)
    assert is_partition(predicted)
    logits = model(quantized)
    assert logits.shape == (3, 20, 7)
    # predict decodes canonically (recovery.canonical_owners); Eq. (10)'s per-position argmax stays available
    argmax = predict_source(model, quantized, decode="argmax")
    assert is_partition(argmax) and torch.equal(source_from_logits(logits), argmax)
    assert torch.equal(argmax.argmax(dim=1), logits.argmax(dim=-1))


@pytest.mark.parametrize("kind", ["bce", "ce"])
def test_source_recovery_loss_falls(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    B, K, L, D = 4, 6, 16, 8
    quantized = torch.randn(B, K, D, generator=g).sign()
    source = random_partition(B, K, L, g)
    model = SourceRecovery(num_tokens=L, code_dim=D, dim=32, depth=2, num_heads=4, ffn_dim=64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = source_recovery_loss(model(quantized), source, kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.25 * losses[0], losses
    # a random partition is not canonical (no encoder makes it): score Eq. (10)'s per-position argmax
    correct = (predict_source(model, quantized, decode="argmax") == source).all(dim=1).float().mean()
    assert correct > 0.9, correct


def test_source_recovery_loss_values():
    # bce at uniform logits: every entry has S_hat = 1/K
    B, K, L = 2, 4, 8
    source = random_partition(B, K, L, torch.Generator().manual_seed(0))
    logits = torch.zeros(B, L, K)
    p = torch.tensor(1.0 / K)
    expected = -(source * p.log() + (1 - source) * (1 - p).log()).mean()
    assert torch.allclose(source_recovery_loss(logits, source, "bce"), expected)
    assert torch.allclose(source_recovery_loss(logits, source, "ce"), torch.log(torch.tensor(4.0)))
    # a confident correct prediction is finite (no 0 * log 0) and near zero
    sharp = 100.0 * source.transpose(1, 2)
    assert 0 <= source_recovery_loss(sharp, source, "bce").item() < 1e-4
    with pytest.raises(ValueError, match="unknown kind"):
        source_recovery_loss(logits, source, "mse")


# ---------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("variant", DEMOS)
def test_demo_forward_backward(variant):
    torch.manual_seed(0)
    model = build_tokenizer(variant)
    c = model.config
    K, L = c.kept, model.num_tokens
    assert model.grid ** 2 == L and model.resolution == 32
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(images, K)
    assert out.reconstruction.shape == (2, 3, 32, 32)
    assert out.encoded.z.shape == (2, K, c.bits)
    assert out.encoded.hidden.shape[:2] == (2, K)
    assert out.encoded.source.shape == (2, K, L)
    assert out.encoded.size.shape == (2, K, 1)
    assert out.encoded.global_feature.shape == (2, out.encoded.hidden.shape[-1])
    assert out.source_logits.shape == (2, L, K)
    source = out.encoded.source
    assert is_partition(source)
    assert torch.equal(out.encoded.size[..., 0], source.sum(dim=-1))
    first = source.argmax(dim=-1)  # tokens come sorted by the first position they cover
    assert bool((first[:, 1:] > first[:, :-1]).all())
    loss = ((out.reconstruction - images) ** 2).mean() + 0.25 * out.quant.commitment_loss \
        + 0.1 * out.quant.entropy_loss + 0.5 * out.source_loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        predicted = model(images, K, predicted_source=True)
        assert predicted.reconstruction.shape == (2, 3, 32, 32)
        assert torch.equal(model.decode(out.quant.quantized, source), out.reconstruction)


def test_no_merging_gives_identity_source():
    model = build_tokenizer("G+R-demo")
    L = model.num_tokens
    encoded = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1, kept=L)
    assert torch.equal(encoded.source, torch.eye(L).expand(2, L, L))
    assert torch.equal(encoded.size, torch.ones(2, L, 1))


def test_build_overrides_and_errors():
    model = build_tokenizer("R-demo", bits=8, schedule="square")
    assert model.config.bits == 8 and model.quantizer.bits == 8
    assert model.encode(torch.zeros(1, 3, 32, 32), kept=9).z.shape == (1, 9, 8)
    assert sum(model.encoder.merge_schedule(9)) == 64 - 9
    saved = dataclasses.asdict(model.config)  # what a checkpoint stores (YAML/JSON: lists)
    saved["ch_mult"] = list(saved["ch_mult"])
    assert TokenizerConfig(**saved) == model.config == tokenizer_config("R-demo", bits=8,
                                                                          schedule="square")
    with pytest.raises(ValueError, match="unknown tokenizer variant"):
        build_tokenizer("XL")
    with pytest.raises(TypeError, match="bitz"):
        build_tokenizer("G-demo", bitz=8)
    with pytest.raises(ValueError, match="kept"):
        model.encode(torch.zeros(1, 3, 32, 32), kept=65)


@pytest.mark.parametrize("variant", PAPER)
def test_paper_forward_on_meta(variant, meta_autocast):
    with torch.device("meta"):
        model = build_tokenizer(variant)
        K, L = model.config.kept, model.num_tokens
        out = model(torch.empty(2, 3, 256, 256), K)
    assert (L, K) == {"G": (1024, 256), "G+R": (256, 144), "R": (256, 36)}[variant]
    assert out.encoded.z.shape == (2, K, 18)
    assert out.encoded.source.shape == (2, K, L)
    assert out.source_logits.shape == (2, L, K)
    assert out.reconstruction.shape == (2, 3, 256, 256)


@pytest.mark.parametrize("variant", PAPER)
def test_paper_parameter_counts(variant):
    with torch.device("meta"):
        model = build_tokenizer(variant)
    counts = model.parameter_counts()
    encoder, decoder = TABLE_A1[variant]
    assert abs(counts["encoder"] / 1e6 - encoder) / encoder < 0.05, counts
    assert abs(counts["decoder"] / 1e6 - decoder) / decoder < 0.05, counts


def test_demo_presets_are_small():
    for variant in DEMOS:
        with torch.device("meta"):
            assert build_tokenizer(variant).parameter_counts()["total"] < 1.5e6
    assert set(PRESETS) == set(PAPER) | set(DEMOS)


# ---------------------------------------------------------------------------------------------
# Gradient routing


def _reaches(loss: torch.Tensor, module: torch.nn.Module) -> bool:
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("source_grad_to_encoder", [True, False])
def test_gradient_routing(source_grad_to_encoder):
    torch.manual_seed(0)
    model = build_tokenizer("G+R-demo")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(images, model.config.kept, source_grad_to_encoder=source_grad_to_encoder)
    enc, dec, rec = model.encoder, model.decoder, model.recovery
    commitment = out.quant.commitment_loss
    assert _reaches(commitment, enc) and not _reaches(commitment, dec)
    assert not _reaches(commitment, rec)
    recon = ((out.reconstruction - images) ** 2).mean()
    assert _reaches(recon, dec) and _reaches(recon, enc)  # encoder via straight-through
    assert not _reaches(recon, rec)
    assert _reaches(out.source_loss, rec) and not _reaches(out.source_loss, dec)
    assert _reaches(out.source_loss, enc) == source_grad_to_encoder


# ---------------------------------------------------------------------------------------------
# DINOv2 weight selection


def _tiny_dinov2_state_dict() -> dict[str, torch.Tensor]:
    """A random ViT with timm's DINOv2 parameter names (LayerScale ls1/ls2), width 128, 6 blocks."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=28, patch_size=14, embed_dim=128, depth=6, num_heads=2,
                            init_values=1e-5, num_classes=0)
    state = vit.state_dict()
    return {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}  # LayerScale not constant


def test_init_from_dinov2(tmp_path):
    state = _tiny_dinov2_state_dict()
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(state, path)
    model = build_tokenizer("G-demo")  # encoder width 64, 4 blocks
    loaded = init_from_dinov2(model.encoder, path)
    assert "blocks.3.attn.qkv.weight" in loaded and "cls_token" in loaded
    block = model.encoder.blocks[2]
    # 128 -> 64 along every dimension: even indices
    assert torch.equal(block.attn.proj.weight, state["blocks.2.attn.proj.weight"][::2, ::2])
    assert torch.equal(block.mlp.fc1.weight, state["blocks.2.mlp.fc1.weight"][::2, ::2])
    assert torch.equal(block.ls1.gamma, state["blocks.2.ls1.gamma"][::2])
    q_src, k_src, v_src = state["blocks.2.attn.qkv.weight"].chunk(3)
    q, k, v = block.attn.qkv.weight.chunk(3)  # per q/k/v chunk, not across the fused 3C rows
    assert torch.equal(k, k_src[::2, ::2]) and torch.equal(v, v_src[::2, ::2])
    assert torch.equal(block.attn.qkv.bias.chunk(3)[1], state["blocks.2.attn.qkv.bias"].chunk(3)[1][::2])
    assert torch.equal(model.encoder.cls_token, state["cls_token"][..., ::2])
    out = model(torch.rand(1, 3, 32, 32) * 2 - 1, 64)
    assert torch.isfinite(out.reconstruction).all()


def test_init_from_dinov2_errors(tmp_path):
    model = build_tokenizer("G-demo")
    missing = tmp_path / "nowhere" / "dinov2_vitb14_pretrain.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/dinov2_vitb14_pretrain.pth"):
        init_from_dinov2(model.encoder, missing)
    state = _tiny_dinov2_state_dict()
    del state["blocks.1.mlp.fc2.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(KeyError, match="blocks.1.mlp.fc2.weight"):
        init_from_dinov2(model.encoder, path)


def test_uniform_element_selection_non_divisible():
    weight = torch.arange(96 * 10, dtype=torch.float32).reshape(96, 10)
    out = uniform_element_selection(weight, (64, 10))
    index = torch.linspace(0, 95, 64).round().long()
    assert torch.equal(out, weight[index])
    assert out[0, 0] == weight[0, 0] and torch.equal(out[-1], weight[-1])
    with pytest.raises(ValueError, match="larger"):
        uniform_element_selection(weight, (97, 10))


def test_source_recovery_order_features():
    from mergevq.tokenizer.recovery import SourceRecovery, rank_features

    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 6).sign()
    perm = torch.tensor([3, 0, 4, 1, 2])
    as_set = SourceRecovery(num_tokens=12, code_dim=6, dim=16, depth=1, num_heads=2, ffn_dim=32, use_order=False)
    # content only: permuting the tokens permutes the logits' K axis and nothing else
    torch.testing.assert_close(as_set(tokens[:, perm]), as_set(tokens)[:, :, perm])
    ordered = SourceRecovery(num_tokens=12, code_dim=6, dim=16, depth=1, num_heads=2, ffn_dim=32, use_order=True)
    assert not torch.allclose(ordered(tokens[:, perm]), ordered(tokens)[:, :, perm])
    # relative ranks: the middle token of any odd K gets the same features
    torch.testing.assert_close(rank_features(9, 4)[4], rank_features(25, 4)[12])


# ---------------------------------------------------------------------------------------------
# Decoder positional information (the authors' with_dw_conv=True)


def test_decoder_block_without_dw_conv_is_tome_block_at_r0():
    from mergevq.tokenizer.decoder import DecoderBlock
    from mergevq.tokenizer.tome import ToMeBlock

    torch.manual_seed(0)
    tome = ToMeBlock(32, 4, layer_scale_init=0.5).eval()
    block = DecoderBlock(32, 4, layer_scale_init=0.5, dw_conv=False).eval()
    block.load_state_dict(tome.state_dict())  # same parameter names
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(block(x), tome(x, 0).x)


def test_mix_mlp_mixes_only_grid_neighbours():
    from mergevq.tokenizer.decoder import MixMlp

    torch.manual_seed(0)
    mlp = MixMlp(8, 16)
    g = 6
    x = torch.randn(1, g * g, 8)
    p = 2 * g + 3  # row 2, column 3
    moved = x.clone()
    moved[0, p] += 1.0
    changed = (mlp(moved) - mlp(x)).abs().amax(dim=-1)[0] > 0  # (L,)
    rows, cols = torch.arange(g * g) // g, torch.arange(g * g) % g
    neighbours = ((rows - 2).abs() <= 1) & ((cols - 3).abs() <= 1)  # the 3x3 window, row-major grid
    assert torch.equal(changed, neighbours)


@pytest.mark.parametrize("dw_conv", [True, False])
def test_decoder_positional_parts(dw_conv):
    model = build_tokenizer("G+R-demo", dec_dw_conv=dw_conv)
    names = set(model.decoder.state_dict())
    assert ("pos_conv.weight" in names) == dw_conv and ("pos_embed" in names) != dw_conv
    assert ("blocks.0.mlp.dwconv.weight" in names) == dw_conv
    if dw_conv:
        conv = model.decoder.blocks[0].mlp.dwconv
        assert conv.groups == conv.in_channels == conv.out_channels == 4 * model.decoder.dim
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model(images, 36).reconstruction.shape == (2, 3, 32, 32)


def test_load_tokenizer_reads_artefacts_from_before_the_new_fields(tmp_path):
    from mergevq.tokenizer import LEGACY_FIELDS, load_tokenizer

    model = build_tokenizer("R-demo", **LEGACY_FIELDS)
    saved = dataclasses.asdict(model.config)
    for key in LEGACY_FIELDS:
        del saved[key]  # an artefact written before these fields existed
    path = tmp_path / "model.pt"
    torch.save({"tokenizer_config": saved, "ema": model.state_dict()}, path)
    loaded, _ = load_tokenizer(path)
    assert loaded.config == model.config and not loaded.config.dec_dw_conv


# ---------------------------------------------------------------------------------------------
# Encoder at another resolution (the 224-px alignment views of a 256-px model)


def test_encoder_any_resolution():
    torch.manual_seed(0)
    model = build_tokenizer("G+R-demo").eval()  # 32 px, f = 4: 8 x 8 tokens
    enc = model.encoder
    assert torch.equal(enc.position_embedding(enc.grid), enc.pos_embed)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(enc(x, 36, any_resolution=True).z, enc(x, 36).z)
    out = enc(torch.rand(2, 3, 28, 28) * 2 - 1, 28, any_resolution=True)  # 7 x 7 tokens
    assert out.source.shape == (2, 28, 49) and is_partition(out.source)
    with pytest.raises(ValueError, match="32px"):
        enc(torch.rand(1, 3, 28, 28), 28)  # off by default: a wrongly sized input is an error
    with pytest.raises(ValueError, match="multiple of 4"):
        enc(torch.rand(1, 3, 30, 30), 28, any_resolution=True)
