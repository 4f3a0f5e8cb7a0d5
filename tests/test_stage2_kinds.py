"""Stage 2 for MergeAR and RandAR: codes at several K, the per-sample K draw, training through the
shared loop, the keep-rule report, sampling settings and RandAR's decoding through S_hat."""
import argparse
import dataclasses

import pytest
import torch
import yaml

from mergevq.files import torch_save, write_json
from mergevq.generator.codes import SHARD_FORMAT, CodeShard, MultiKCodeDataset, open_codes, pack_shard
from mergevq.train.distributed import DistEnv

TINY_GPT = {"n_layer": 1, "n_head": 2, "dim": 32, "multiple_of": 16, "n_intra_layer": 1}
GRID, L, BITS = 4, 16, 6


def canonical_owner(kept: int, n: int, g: torch.Generator) -> torch.Tensor:
    """n random canonical partitions of L positions into `kept` groups (first occurrences 0..K-1)."""
    rows = []
    for _ in range(n):
        owner = torch.cat([torch.arange(kept), torch.randint(0, kept, (L - kept,), generator=g)])
        owner = owner[torch.randperm(L, generator=g)]
        first = {int(o): i for i, o in enumerate(dict.fromkeys(owner.tolist()))}
        rows.append(torch.tensor([first[int(o)] for o in owner]))
    return torch.stack(rows)


def write_codes(folder, split, kept, n=24, labels_seed=0, sha="0" * 64):
    """Synthetic extract-codes output at K = kept (same labels for every K of one labels_seed)."""
    g = torch.Generator().manual_seed(1000 + kept)
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(labels_seed))
    shard = CodeShard(torch.randint(0, 2 ** BITS, (n, 1, kept), generator=g), canonical_owner(kept, n, g)[:, None],
                      labels)
    folder = folder / f"k{kept}"
    folder.mkdir(parents=True, exist_ok=True)
    torch_save(pack_shard(shard, {"synthetic": kept}), folder / f"{split}-00000.pt")
    write_json(folder / f"{split}.json", {
        "format": SHARD_FORMAT, "split": split, "kept": kept, "tokens": L, "grid": GRID, "bits": BITS,
        "num_images": n, "augmentations": 1, "num_classes": 10, "variant": "G+R", "tokenizer": {"sha256": sha},
        "shards": [{"file": f"{split}-00000.pt", "first": 0, "count": n}]})
    return folder / f"{split}.json"


def tiny_config(tmp_path, repo_root):
    cfg = yaml.safe_load((repo_root / "config" / "demo.yaml").read_text())
    for kind in ("mergear", "randar"):
        cfg["generator"][kind].update(model_overrides=dict(TINY_GPT), batch_size=8, epochs=2, log_every=2,
                                      val_every=5, ckpt_every=3, warmup_steps=2, val_images=16)
    # the tiny codes live on a 4x4 grid: K = (2 + T)^2 in [4, 16]
    cfg["generator"]["mergear"]["merge_sampling"] = {
        "G+R": {"distribution": "gaussian", "k0": 2, "mu": 0.0, "sigma": 1.0, "k_min": 4, "k_max": 16, "floor": 0.05}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------------------------


def test_multi_k_dataset_stacks_every_k_padded(tmp_path):
    paths = [write_codes(tmp_path, "train", k) for k in (16, 4, 9)]
    data = open_codes(paths)
    assert isinstance(data, MultiKCodeDataset) and data.kept == [4, 9, 16] and len(data) == 24
    indices, owner, label = data[5]
    assert indices.shape == (3, 1, 16) and owner.shape == (3, 1, L)
    for j, k in enumerate((4, 9, 16)):
        single = open_codes(tmp_path / f"k{k}" / "train.json")[5]
        assert torch.equal(indices[j, :, :k], single[0]) and not indices[j, :, k:].any()
        assert torch.equal(owner[j], single[1]) and int(owner[j].max()) + 1 == k and label == single[2]


def test_multi_k_dataset_refuses_mismatched_manifests(tmp_path):
    a = write_codes(tmp_path, "train", 4)
    with pytest.raises(ValueError, match="repeat a K"):
        MultiKCodeDataset([a, a])
    b = write_codes(tmp_path / "other", "train", 9, labels_seed=1)
    with pytest.raises(ValueError, match="different images"):
        MultiKCodeDataset([a, b])
    c = write_codes(tmp_path / "tok", "train", 9, sha="1" * 64)
    with pytest.raises(ValueError, match="different tokenizers"):
        MultiKCodeDataset([a, c])


def test_model_inputs_per_kind():
    from mergevq.train.generator import model_inputs

    g = torch.Generator().manual_seed(0)
    owner = canonical_owner(9, 3, g)
    indices = torch.nn.functional.pad(torch.randint(0, 64, (3, 9), generator=g), (0, 7))  # padded to 16
    codes, extra = model_inputs("mergear", indices, owner)
    assert torch.equal(codes, indices.gather(1, owner)) and extra["kept"].tolist() == [9, 9, 9]
    codes, extra = model_inputs("randar", indices[:, :9], owner)
    assert torch.equal(codes, indices[:, :9]) and extra == {}


def test_keep_rule_report_counts_collisions(tmp_path):
    from mergevq.generator.codes import CodeDataset
    from mergevq.train.generator import keep_rule_report

    path = write_codes(tmp_path, "train", 9, n=4)
    state = torch.load(path.parent / "train-00000.pt")
    state["indices"][0, 0, 5] = state["indices"][0, 0, 2]  # sample 0: groups 2 and 5 share a code
    state["indices"][1:, 0] = torch.arange(9)  # the rest: distinct codes
    torch_save(state, path.parent / "train-00000.pt")
    report = keep_rule_report(CodeDataset(path))["9"]
    assert report["sequences"] == pytest.approx(1 / 4) and report["positions"] == pytest.approx(1 / 4 / L)


def test_mergear_trains_with_k_drawn_from_the_sampler(tmp_path, repo_root):
    from mergevq.config import load_config
    from mergevq.train.generator import GeneratorStage, loop_config, resume_hash
    from mergevq.train.loop import fit

    cfg = load_config(tiny_config(tmp_path, repo_root))
    data = open_codes([write_codes(tmp_path, "train", k) for k in (4, 9, 16)])
    torch.manual_seed(0)
    stage = GeneratorStage(cfg, "mergear", "G+R", data, DistEnv(), open_codes(write_codes(tmp_path, "val", 9)))
    probs = stage.kept_probs
    assert probs.shape == (3,) and probs.sum().item() == pytest.approx(1.0) and probs[0] > probs[1] > probs[2]
    # the draw: K per sample from the sampler's probabilities (global RNG)
    indices, owner, _ = torch.utils.data.default_collate([data[i] for i in range(24)])
    torch.manual_seed(1)
    picks = [stage.pick_view(indices, owner)[1].amax(1) + 1 for _ in range(40)]
    share = torch.stack([(torch.cat(picks) == k).float().mean() for k in (4, 9, 16)])
    assert (share - probs.float()).abs().max() < 0.05
    captured = []
    orig = stage.model.loss
    stage.model.loss = lambda codes, labels, **kw: captured.append(kw["kept"]) or orig(codes, labels, **kw)
    loop = loop_config(stage.settings, stage.total_steps, cfg["seed"], None, 0)
    fit(stage, data, loop, tmp_path / "run", cfg, resume_hash(cfg, "mergear", data), DistEnv())
    assert set(torch.cat(captured).tolist()) <= {4, 9, 16}
    art = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert art["codes"]["kept"] == [4, 9, 16] and set(art["keep_rule_disagreement"]) == {"4", "9", "16"}
    with pytest.raises(ValueError, match="sampler"):
        GeneratorStage(cfg, "mergear", "G+R", open_codes(write_codes(tmp_path, "train", 9)), DistEnv())
    with pytest.raises(ValueError, match="one K"):
        GeneratorStage(cfg, "randar", "G+R", data, DistEnv())


def test_randar_stage_lays_k_slots_on_a_sqrt_grid(tmp_path, repo_root):
    from mergevq.config import load_config
    from mergevq.train.generator import GeneratorStage

    cfg = load_config(tiny_config(tmp_path, repo_root))
    stage = GeneratorStage(cfg, "randar", "G+R", open_codes(write_codes(tmp_path, "train", 9)), DistEnv())
    assert (stage.model.config.seq_len, stage.model.config.grid) == (9, 3)
    data = open_codes(tmp_path / "k9" / "train.json")
    metrics = stage.train_step(torch.utils.data.default_collate([data[i] for i in range(8)]), 0)
    assert metrics["loss"] > 0


def test_generate_kwargs_follow_the_config(repo_root):
    from mergevq.config import ConfigError, load_config
    from mergevq.eval.sampling import generate_kwargs

    cfg = load_config(repo_root / "config" / "demo.yaml")
    assert generate_kwargs(cfg, "llamagen", "G+R") == {}
    assert generate_kwargs(cfg, "mergear", "G+R") == {"kept": 36}
    assert generate_kwargs(cfg, "randar", "G+R") == {"steps": 16, "cfg_schedule": "linear"}
    with pytest.raises(ConfigError, match="decode_steps.G"):
        generate_kwargs(cfg, "randar", "G")


def test_randar_decoding_goes_through_the_recoverys_s_hat():
    from mergevq.eval.sampling import decode_generated
    from mergevq.generator.codes import decode_merged, source_from_owner
    from mergevq.tokenizer import build_tokenizer
    from mergevq.tokenizer.lfq import indices_to_codes
    from mergevq.tokenizer.recovery import FinetunedRecovery

    torch.manual_seed(0)
    tok = build_tokenizer("G+R-demo", bits=10, kept=36, entropy_group_bits=5, ch=8, num_res_blocks=1, depth=2,
                          heads=2, dec_ch=8, dec_num_res_blocks=1, dec_depth=1, dec_heads=2, rec_dim=16,
                          rec_heads=2, rec_ffn=32).eval()
    codes = torch.randint(0, 1024, (2, 36))
    stage1 = decode_generated("randar", tok, codes)
    assert torch.allclose(stage1, decode_merged(tok, codes), atol=1e-6)
    finetuned = FinetunedRecovery(tok.recovery, tok.decoder, False)
    assert torch.allclose(decode_generated("randar", tok, codes, finetuned), stage1, atol=1e-6)
    # the control: S_hat matters; decoding with another S gives other images
    s_hat = finetuned.source(indices_to_codes(codes, 10))
    assert s_hat.shape == (2, 36, 64) and s_hat.sum(1).eq(1).all()
    other = torch.arange(64).clamp(max=35).expand(2, -1)  # another canonical partition
    assert not torch.equal(source_from_owner(other, 36), s_hat)
    assert not torch.allclose(decode_merged(tok, codes, other), stage1, atol=1e-3)


def test_position_baseline_owner_is_the_mode_per_position():
    from mergevq.eval.generation import position_baseline_owner

    owner = torch.tensor([[0, 1, 1, 2], [0, 0, 1, 2], [0, 1, 2, 2]])
    assert position_baseline_owner(owner, 3).tolist() == [0, 1, 1, 2]



def save_tiny_tokenizer(path):
    """A seeded, tiny G+R tokenizer (K = 36 of 64, 10 bits) saved as a stage-1 artefact at `path`."""
    from mergevq.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer("G+R-demo", bits=10, kept=36, entropy_group_bits=5, ch=8, num_res_blocks=1, depth=2,
                          heads=2, dec_ch=8, dec_num_res_blocks=1, dec_depth=1, dec_heads=2, rec_dim=16,
                          rec_heads=2, rec_ffn=32).eval()
    torch.save({"variant": "G+R", "tokenizer_config": dataclasses.asdict(tok.config), "ema": tok.state_dict(),
                "model": tok.state_dict()}, path)


def test_source_check_decodes_the_same_codes_with_other_sources(tmp_path, monkeypatch):
    from mergevq.eval import generation
    from mergevq.eval.fidelity import sha256_file

    save_tiny_tokenizer(tmp_path / "tok.pt")
    g = torch.Generator().manual_seed(0)
    n = 6
    shard = CodeShard(torch.randint(0, 1024, (n, 1, 36), generator=g),
                      torch.arange(64).clamp(max=35).expand(n, 1, 64).clone(), torch.arange(n))
    torch_save(pack_shard(shard, {}), tmp_path / "train-00000.pt")
    write_json(tmp_path / "train.json", {
        "format": SHARD_FORMAT, "split": "train", "kept": 36, "tokens": 64, "grid": 8, "bits": 10, "num_images": n,
        "augmentations": 1, "num_classes": 10, "tokenizer": {"sha256": "0" * 64},
        "shards": [{"file": "train-00000.pt", "first": 0, "count": n}]})
    seen = []
    # the classifier stands in: record what it is shown, score by mean brightness
    monkeypatch.setattr(generation, "class_consistency",
                        lambda images, labels, clf: seen.append(images) or {"top1": float(images.float().mean() / 255)})
    meta = {"tokenizer": str(tmp_path / "tok.pt"), "tokenizer_sha256": sha256_file(tmp_path / "tok.pt"), "recovery": None}
    codes = torch.randint(0, 1024, (4, 36), generator=g)
    out = generation.source_check(codes, torch.arange(4), meta, tmp_path / "train.json", "clf.pt")
    assert set(out) == {"s_hat", "position_baseline", "random_training_s"} and len(seen) == 2
    # every training S is the same partition here, so both controls decode the same images
    assert torch.equal(seen[0], seen[1]) and seen[0].shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="K = 36"):
        generation.source_check(codes[:, :25], torch.arange(4), meta, tmp_path / "train.json", "clf.pt")


@pytest.mark.parametrize("kind", ["mergear", "randar"])
def test_sample_runs_each_kind_with_its_settings(tmp_path, repo_root, kind):
    import json

    from generator_fixtures import randomise_
    from mergevq.eval.sampling import run
    from mergevq.generator import build_generator

    save_tiny_tokenizer(tmp_path / "tok.pt")
    shape = dict(grid=6, seq_len=36) if kind == "randar" else dict(grid=8)
    gen = randomise_(build_generator(f"{kind}-demo", n_layer=1, dim=32, n_head=2, multiple_of=16, n_intra_layer=1,
                                     **shape), std=0.3)
    torch.save({"generator_config": dataclasses.asdict(gen.config), "model": gen.state_dict(), "name": f"{kind}_G+R",
                "codes": {"tokenizer_sha256": None, "variant": "G+R"}}, tmp_path / "gen.pt")
    args = dict(config=str(repo_root / "config" / "demo.yaml"), generator=str(tmp_path / "gen.pt"),
                tokenizer=str(tmp_path / "tok.pt"), out=str(tmp_path / "s"), num_per_class=1, cfg=2.0, cfg_from=None,
                temperature=None, top_k=None, top_p=None, seed=None, batch_size=4, no_cache=False, shard=0,
                num_shards=1, combine_only=False, set=[], recovery=None)
    assert run(argparse.Namespace(**args)) == 0
    meta = json.loads((tmp_path / "s" / "samples.json").read_text())
    codes = torch.load(tmp_path / "s" / "codes.pt", weights_only=False)["codes"]
    if kind == "mergear":
        assert meta["settings"]["generate"] == {"kept": 36} and codes.shape == (10, 64)
        cache = meta["mergear_cache"]
        assert cache["samples"] == 10 and cache["sequence_length"] == 64 and cache["mean_cache_entries"] < 2 + 63
        with pytest.raises(ValueError, match="--recovery places merged codes"):
            run(argparse.Namespace(**{**args, "out": str(tmp_path / "t"), "recovery": str(tmp_path / "tok.pt")}))
    else:
        assert meta["settings"]["generate"] == {"steps": 16, "cfg_schedule": "linear"} and codes.shape == (10, 36)
