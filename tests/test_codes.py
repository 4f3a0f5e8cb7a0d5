"""Extracted codes: owner <-> S, per-position codes, decoding both ways, shards, resume, flips."""
import dataclasses
import json

import pytest
import torch
import yaml

from mergevq.generator.codes import (CodeDataset, check_owner, decode_merged, decode_positions, owner_from_source,
                                     position_indices, source_from_owner)
from mergevq.tokenizer import build_tokenizer
from mergevq.tokenizer.lfq import indices_to_codes

TINY = {"ch": 8, "num_res_blocks": 1, "depth": 2, "heads": 2, "dec_ch": 8, "dec_num_res_blocks": 1,
        "dec_depth": 1, "dec_heads": 2, "rec_dim": 16, "rec_heads": 2, "rec_ffn": 32}


def tiny_tokenizer(seed=0):
    torch.manual_seed(seed)
    return build_tokenizer("G+R-demo", bits=10, kept=36, entropy_group_bits=5, **TINY).eval()


def save_tokenizer(model, path):
    """A stage-1 model.pt as TokenizerStage.artifact writes it (randomised weights)."""
    torch.save({"variant": "G+R", "preset": "G+R-demo", "tokenizer_config": dataclasses.asdict(model.config),
                "ema": model.state_dict(), "model": model.state_dict(), "kept": 36, "tokens": 64, "step": 0}, path)
    return path


def demo_config(tmp_path, repo_root, val_fraction=0.2, **codes):
    cfg = yaml.safe_load((repo_root / "config" / "demo.yaml").read_text())
    cfg["data"]["val_fraction"] = val_fraction  # to make a split small
    cfg["generator"]["codes"].update(codes)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("kept", [64, 36, 16])
def test_owner_source_round_trip_on_encoder_output(kept):
    model = tiny_tokenizer()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    source = model.encode(x, kept).source  # (B, K, L)
    owner = owner_from_source(source)
    assert owner.shape == (3, 64)
    assert torch.equal(source_from_owner(owner, kept), source)
    if kept == 64:  # no merging: every position is its own token, in raster order
        assert torch.equal(owner, torch.arange(64).expand(3, -1))


def test_check_owner_refuses_non_canonical_partitions():
    check_owner(torch.tensor([[0, 1, 0, 2, 1]]), 3)
    with pytest.raises(ValueError, match="canonical order"):
        check_owner(torch.tensor([[1, 0, 1, 2, 0]]), 3)
    with pytest.raises(ValueError, match="owns no position"):
        check_owner(torch.tensor([[0, 1, 0, 1, 1]]), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        check_owner(torch.tensor([[0, 1, 3, 2, 1]]), 3)
    bad = source_from_owner(torch.tensor([[0, 1, 0, 2, 1]]), 3)
    bad[0, 2, 0] = 1.0  # position 0 covered twice
    with pytest.raises(ValueError, match="partition"):
        owner_from_source(bad)


def test_position_indices_gathers_the_owner_code():
    indices = torch.tensor([[7, 8, 9]])
    owner = torch.tensor([[0, 1, 0, 2, 1]])
    assert position_indices(indices, owner).tolist() == [[7, 8, 7, 9, 8]]


def test_decoding_positions_equals_decoding_merged_with_s():
    """Eq. (14) with the extracted S equals decoding the per-position codes (randomised weights)."""
    model = tiny_tokenizer(seed=1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        enc = model.encode(x, 25)
        indices = model.quantizer(enc.z).indices
        owner = owner_from_source(enc.source)
        reference = model.decode(indices_to_codes(indices, 10), enc.source).clamp(-1, 1)
    merged = decode_merged(model, indices, owner)
    positions = decode_positions(model, position_indices(indices, owner))
    assert torch.allclose(merged, reference, atol=1e-6)
    assert torch.allclose(positions, merged, atol=1e-5), (positions - merged).abs().max()
    # without S, Source Recovery's prediction is used
    codes = indices_to_codes(indices, 10)
    with torch.no_grad():
        predicted = model.decode(codes, model.recovery.predict(codes)).clamp(-1, 1)
    assert torch.allclose(decode_merged(model, indices), predicted, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        decode_positions(model, indices)


def test_extract_codes_shards_manifest_resume(tmp_path, repo_root):
    from mergevq.config import load_config
    from mergevq.data import build_dataset
    from mergevq.train.extract_codes import extract_codes

    model = tiny_tokenizer(seed=2)
    tok = save_tokenizer(model, tmp_path / "tok.pt")
    cfg = load_config(demo_config(tmp_path, repo_root, val_fraction=0.1, shard_size=70))
    out = tmp_path / "codes"
    manifest = extract_codes(cfg, tok, 36, "val", out)
    assert manifest["num_images"] == 180 and len(manifest["shards"]) == 3 and manifest["augmentations"] == 1
    assert json.loads((out / "val.json").read_text())["tokenizer"]["sha256"] == manifest["tokenizer"]["sha256"]
    data = CodeDataset(out / "val.json")
    assert len(data) == 180 and data.kept == 36 and data.tokens == 64
    indices, owner, label = data[150]  # in the third shard
    val = build_dataset(cfg, "val")
    x, y = val[150]
    with torch.no_grad():
        enc = model.encode(x[None], 36)
        assert torch.equal(indices[0], model.quantizer(enc.z).indices[0])
    assert torch.equal(owner[0], enc.source.argmax(1)[0]) and int(label) == int(y)
    all_codes = data.tensors()
    assert all_codes.indices.shape == (180, 1, 36) and all_codes.owner.shape == (180, 1, 64)

    # resume: only a missing shard is encoded again, to the same bytes
    before = (out / "val-00001.pt").read_bytes()
    (out / "val-00001.pt").unlink()
    again = extract_codes(cfg, tok, 36, "val", out)
    assert again["encoded_images_this_run"] == 70
    assert torch.equal(CodeDataset(out / "val.json").tensors().indices, all_codes.indices)
    assert len(before) > 0
    # a shard made by another tokenizer is not reused
    other = save_tokenizer(tiny_tokenizer(seed=3), tmp_path / "other.pt")
    assert extract_codes(cfg, other, 36, "val", out)["encoded_images_this_run"] == 180


def test_extract_codes_flip_stores_the_mirrored_image(tmp_path, repo_root):
    from mergevq.config import load_config
    from mergevq.data import build_dataset
    from mergevq.train.extract_codes import extract_codes

    model = tiny_tokenizer(seed=4)
    tok = save_tokenizer(model, tmp_path / "tok.pt")
    cfg = load_config(demo_config(tmp_path, repo_root, val_fraction=0.95, flip=True))  # 89 training images
    manifest = extract_codes(cfg, tok, 25, "train", tmp_path / "codes")
    assert manifest["augmentations"] == 2
    data = CodeDataset(tmp_path / "codes" / "train.json")
    indices, owner, _ = data[5]
    x = build_dataset(cfg, "train")[5][0][None].flip(-1)
    with torch.no_grad():
        enc = model.encode(x, 25)
    assert torch.equal(indices[1], model.quantizer(enc.z).indices[0])
    assert torch.equal(owner[1], enc.source.argmax(1)[0])
    # flips are a training augmentation only
    small_val = load_config(demo_config(tmp_path, repo_root, val_fraction=0.05, flip=True))
    assert extract_codes(small_val, tok, 25, "val", tmp_path / "codes")["augmentations"] == 1


def test_extract_codes_refuses_bad_kept(tmp_path, repo_root):
    from mergevq.config import load_config
    from mergevq.train.extract_codes import extract_codes

    tok = save_tokenizer(tiny_tokenizer(), tmp_path / "tok.pt")
    with pytest.raises(ValueError, match="outside"):
        extract_codes(load_config(demo_config(tmp_path, repo_root)), tok, 65, "val", tmp_path / "codes")
    with pytest.raises(FileNotFoundError, match="extract-codes"):
        CodeDataset(tmp_path / "codes" / "val.json")
