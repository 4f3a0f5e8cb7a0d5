"""`mergevq sample`: per-index seeds (batch sizes and shards give the same images), resume, the
combined outputs, CFG selection; generation metrics: memorisation statistics, class consistency."""
import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch

from mergevq.files import load_checkpoint

TINY_TOK = {"ch": 8, "num_res_blocks": 1, "depth": 2, "heads": 2, "dec_ch": 8, "dec_num_res_blocks": 1,
            "dec_depth": 1, "dec_heads": 2, "rec_dim": 16, "rec_heads": 2, "rec_ffn": 32}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """A tokenizer and a generator with randomised weights, saved as their trainers save them."""
    from mergevq.generator import build_generator
    from mergevq.tokenizer import build_tokenizer

    folder = tmp_path_factory.mktemp("artefacts")
    torch.manual_seed(0)
    tok = build_tokenizer("G+R-demo", bits=10, kept=36, entropy_group_bits=5, **TINY_TOK).eval()
    torch.save({"variant": "G+R", "tokenizer_config": dataclasses.asdict(tok.config), "ema": tok.state_dict(),
                "model": tok.state_dict()}, folder / "tok.pt")
    gen = build_generator("llamagen-demo", n_layer=1, dim=32, n_head=2, multiple_of=16, n_intra_layer=1)
    with torch.no_grad():  # zero-initialised heads would make every sample the same
        for p in gen.parameters():
            p.normal_(0, 0.5)
    torch.save({"generator_config": dataclasses.asdict(gen.config), "model": gen.state_dict(), "name": "llamagen_G+R",
                "codes": {"tokenizer_sha256": None}}, folder / "gen.pt")
    return folder


def sample(artefacts, repo_root, out, **kw):
    from mergevq.eval.sampling import run

    args = dict(config=str(repo_root / "config" / "demo.yaml"), generator=str(artefacts / "gen.pt"),
                tokenizer=str(artefacts / "tok.pt"), out=str(out), num_per_class=2, cfg=2.0, cfg_from=None,
                temperature=None, top_k=None, top_p=None, seed=None, batch_size=7, no_cache=False, shard=0,
                num_shards=1, combine_only=False, set=[], recovery=None)
    args.update(kw)
    assert run(argparse.Namespace(**args)) == 0
    return out


def pngs(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}


def test_batch_size_does_not_change_the_samples(artefacts, repo_root, tmp_path):
    a = sample(artefacts, repo_root, tmp_path / "a", batch_size=7)
    b = sample(artefacts, repo_root, tmp_path / "b", batch_size=3, no_cache=True)
    assert len(pngs(a)) == 20 and pngs(a) == pngs(b)
    codes = load_checkpoint(a / "codes.pt")
    assert codes["labels"].tolist() == [c for c in range(10) for _ in range(2)]  # classes per index
    assert len({tuple(r) for r in codes["codes"].tolist()}) > 10  # per-row noise: no shared streams
    with np.load(a / "samples.npz") as data:
        arr = data["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (20, 32, 32, 3)
    from PIL import Image

    assert np.array_equal(arr[13], np.asarray(Image.open(a / "images" / "000013.png").convert("RGB")))
    meta = json.loads((a / "samples.json").read_text())
    assert meta["settings"]["cfg_scale"] == 2.0 and meta["num_samples"] == 20 and meta["decode_tokens_per_s"] > 0
    # another seed gives other samples
    c = sample(artefacts, repo_root, tmp_path / "c", seed=1)
    assert pngs(c) != pngs(a)


def test_resume_and_shards_give_the_same_folder(artefacts, repo_root, tmp_path):
    full = sample(artefacts, repo_root, tmp_path / "full", batch_size=3)
    # an interrupted run: one batch lost; the rerun redoes only that one
    (full / "parts" / "codes-00002.pt").unlink()
    (full / "samples.json").unlink()
    stamp = {p.name: p.stat().st_mtime_ns for p in (full / "parts").glob("codes-*.pt")}
    sample(artefacts, repo_root, full, batch_size=3)
    assert {p.name: p.stat().st_mtime_ns for p in (full / "parts").glob("codes-*.pt") if p.name in stamp} == stamp
    # two separate shard jobs, then the combine step
    sharded = tmp_path / "sharded"
    for shard in range(2):
        sample(artefacts, repo_root, sharded, batch_size=3, shard=shard, num_shards=2)
    assert not (sharded / "samples.json").exists()
    sample(artefacts, repo_root, sharded, batch_size=3, combine_only=True)
    assert pngs(sharded) == pngs(full)
    assert torch.equal(load_checkpoint(sharded / "codes.pt")["codes"], load_checkpoint(full / "codes.pt")["codes"])
    # a folder holds one setting
    with pytest.raises(ValueError, match="other settings"):
        sample(artefacts, repo_root, full, batch_size=3, cfg=1.0)


def test_combine_refuses_missing_shards(artefacts, repo_root, tmp_path):
    sample(artefacts, repo_root, tmp_path / "s", batch_size=3, shard=0, num_shards=2)
    with pytest.raises(FileNotFoundError, match="before combining"):
        sample(artefacts, repo_root, tmp_path / "s", batch_size=3, combine_only=True)


def test_cfg_selection_takes_the_lowest_gfid(tmp_path):
    from mergevq.eval.sampling import select_cfg

    files = []
    for scale, gfid in ((1.0, 30.0), (2.0, 12.5), (3.0, 12.5), (4.0, 20.0)):
        files.append(tmp_path / f"{scale}.json")
        files[-1].write_text(json.dumps({"gfid": gfid, "is": 2.0, "settings": {"cfg_scale": scale}}))
    best, rows = select_cfg(files)
    assert best == 2.0 and [r["cfg_scale"] for r in rows] == [1.0, 2.0, 3.0, 4.0]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="generation-metrics"):
        select_cfg([tmp_path / "bad.json"])


def test_sample_seeds_depend_on_index_and_seed_only():
    from mergevq.eval.sampling import sample_seeds

    a = sample_seeds(0, torch.arange(10))
    assert torch.equal(a[3:6], sample_seeds(0, torch.arange(3, 6)))
    assert len(set(a.tolist())) == 10 and not torch.equal(a, sample_seeds(1, torch.arange(10)))
    assert bool((a >= 0).all())


def test_nearest_hamming_and_memorisation_statistics():
    from mergevq.eval.generation import memorisation, nearest_hamming

    train = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2]])
    queries = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 5], [7, 7, 7, 7], [2, 2, 9, 9]])
    assert nearest_hamming(queries, train, chunk=3).tolist() == [0.0, 0.25, 1.0, 0.5]
    # brute force on random data, several chunk sizes
    g = torch.Generator().manual_seed(0)
    q, r = torch.randint(0, 3, (37, 8), generator=g), torch.randint(0, 3, (50, 8), generator=g)
    brute = torch.stack([(qi[None] != r).sum(1).min() for qi in q]).float() / 8
    assert torch.equal(nearest_hamming(q, r, chunk=5), brute)
    labels = torch.tensor([0, 0, 1, 1])
    val = torch.tensor([[1, 1, 5, 5], [7, 7, 7, 1], [0, 6, 6, 6], [2, 8, 8, 8]])  # distances 0.5, 0.75, 0.75, 0.75
    m = memorisation(queries, labels, train, torch.tensor([0, 1, 2]), val, quantile=0.25)
    assert m["near_duplicate_threshold"] == 0.5  # the validation sequences' lower quartile
    assert m["samples"]["near_duplicate_share"] == 0.75 and m["samples"]["exact_copy_share"] == 0.25
    assert m["validation"]["near_duplicate_share"] == 0.25 and m["validation"]["count"] == 4
    assert m["distinct_per_class"] == {"0": 2, "1": 2} and m["distinct_share"] == 1.0


def test_class_consistency_reads_the_classifier(tmp_path):
    from mergevq.eval.demo_classifier import DemoClassifier, DemoClassifierConfig, save_demo_classifier
    from mergevq.eval.generation import class_consistency

    torch.manual_seed(0)
    net = DemoClassifier(DemoClassifierConfig(feature_dim=16, width=4)).eval()
    path = tmp_path / "clf.pt"
    save_demo_classifier(net, path)
    images = (torch.rand(12, 3, 32, 32) * 255).to(torch.uint8)
    with torch.no_grad():
        predicted = net(images.float().div(127.5).sub(1)).logits.argmax(-1)
    labels = predicted.clone()
    labels[:3] = (labels[:3] + 1) % 10  # three wrong
    result = class_consistency(images, labels, path)
    assert result["top1"] == pytest.approx(9 / 12)
    assert sum(v * int((labels == int(c)).sum()) for c, v in result["per_class"].items()) == pytest.approx(9)
