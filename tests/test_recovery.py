"""Source Recovery: canonical decoding, the fine-tuning stage (exact resume), its artefact, and
`evaluate --recovery` (tiny CPU runs, randomised weights)."""
import argparse
import dataclasses
import itertools

import pytest
import torch
import yaml

from mergevq.tokenizer import build_tokenizer, load_tokenizer
from mergevq.tokenizer.recovery import (FinetunedRecovery, canonical_owners, canonical_source, load_recovery,
                                        predict_source, recovery_artifact, source_from_logits, token_recovery)

from test_eval import demo_weights  # noqa: E402,F401  (a tiny untrained demo classifier, a fixture)

TINY = dict(ch=8, num_res_blocks=1, dim=16, depth=2, heads=2, dec_ch=8, dec_num_res_blocks=1, dec_dim=16,
            dec_depth=1, dec_heads=2, rec_dim=16, rec_heads=2, rec_ffn=32)


def canonical_matrices(L: int, K: int):
    """Every owner sequence (L,) of a canonical source: tokens first appear in the order 0..K-1."""
    for owners in itertools.product(range(K), repeat=L):
        firsts = [owners.index(k) if k in owners else None for k in range(K)]
        if None not in firsts and firsts == sorted(firsts):
            yield owners


@pytest.mark.parametrize("L,K", [(6, 3), (5, 1), (5, 5), (7, 4)])
def test_canonical_owners_is_the_best_canonical_matrix(L, K):
    g = torch.Generator().manual_seed(L * 10 + K)
    logits = torch.randn(4, L, K, generator=g) * 3
    log_p = logits.log_softmax(-1)
    owners = canonical_owners(logits)
    for b in range(4):
        best = max(canonical_matrices(L, K), key=lambda o: float(sum(log_p[b, l, o[l]] for l in range(L))))
        assert owners[b].tolist() == list(best)
    source = canonical_source(logits)
    assert source.shape == (4, K, L) and torch.equal(source.sum(1), torch.ones(4, L))
    assert bool((source.sum(2) >= 1).all())  # every token owns a position (Eq. 10's argmax may not)
    with pytest.raises(ValueError, match="cannot each own"):
        canonical_owners(torch.randn(1, 3, 4))


def test_the_encoder_makes_canonical_sources_and_decoding_them_is_exact():
    torch.manual_seed(0)
    model = build_tokenizer("G+R-demo", **TINY).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    for kept in (64, 36, 16):
        with torch.no_grad():
            source = model.encode(x, kept).source  # (B, K, L)
        owners = source.argmax(1)
        firsts = source.argmax(2)  # (B, K): first position of each token
        assert bool((firsts[:, 1:] > firsts[:, :-1]).all()) and bool((firsts[:, 0] == 0).all())
        # scores that favour the true owner give back exactly S, even when they favour it weakly
        noisy = torch.log(source.transpose(1, 2) * 0.5 + 0.5 / kept)
        assert torch.equal(canonical_owners(noisy), owners)


def test_predict_source_decodes_canonically_and_finetuned_recovery_uses_its_decoder():
    torch.manual_seed(0)
    model = build_tokenizer("G+R-demo", **TINY).eval()
    q = torch.sign(torch.randn(2, 25, model.config.bits))  # codes of K = 25 tokens
    with torch.no_grad():
        logits = model.recovery(q)
    assert torch.equal(predict_source(model.recovery, q), canonical_source(logits))
    assert torch.equal(model.recovery.predict(q), canonical_source(logits))
    assert torch.equal(predict_source(model.recovery, q, "argmax"), source_from_logits(logits))
    with pytest.raises(ValueError, match="unknown decode"):
        predict_source(model.recovery, q, "greedy")
    same = FinetunedRecovery(model.recovery, model.decoder, False)
    with torch.no_grad():
        assert torch.equal(same.decode(q), model.decode(q, canonical_source(logits)))
        other = build_tokenizer("G+R-demo", **TINY).decoder.eval()
        ft = FinetunedRecovery(model.recovery, other, True)
        assert torch.allclose(ft.decode(q), other(token_recovery(q, canonical_source(logits))))
    from mergevq.report.images import reconstruction_rows

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rows = reconstruction_rows(model, x, [36, 25], finetuned=ft)  # original, then S, S_hat, S_hat ft per K
    assert rows.shape == (2 * 7, 3, 32, 32)
    with torch.no_grad():
        out = model(x, 25)
        assert torch.allclose(rows[-2:], ft.decode(out.quant.quantized).clamp(-1, 1))


# ---------------------------------------------------------------------------------------------
# The fine-tuning stage


def _tokenizer_file(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = build_tokenizer("G+R-demo", **TINY).eval()
    path = tmp_path / f"tokenizer{seed}.pt"
    torch.save({"variant": "G+R", "tokenizer_config": dataclasses.asdict(model.config), "ema": model.state_dict(),
                "model": model.state_dict(), "kept": 36, "tokens": 64, "step": 0}, path)
    return path


def _config(tmp_path, repo_root, **settings):
    cfg = yaml.safe_load((repo_root / "config" / "demo.yaml").read_text())
    cfg["generator"]["recovery_finetune"].update(batch_size=128, epochs=1, **settings)  # 11 steps
    cfg["tokenizer"]["train"]["val_images"] = 16
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _finetune(cfg, tokenizer, out, max_steps=None, generator=None, init=None):
    from mergevq.train import recovery

    return recovery.run(argparse.Namespace(config=str(cfg), tokenizer=str(tokenizer), out=str(out),
                                           max_steps=max_steps, set=[], generator=generator, init=init))


def _randar_file(tmp_path, tokenizer, bits):
    """A RandAR artefact with random weights on the tokenizer's K = 36 codes."""
    from mergevq.eval.fidelity import sha256_file
    from mergevq.generator import build_generator
    from generator_fixtures import randomise_

    gen = randomise_(build_generator("randar-demo", n_layer=1, dim=32, n_head=2, multiple_of=16, n_intra_layer=1,
                                     codebook_bits=bits, grid=6, seq_len=36), std=0.5)
    path = tmp_path / "randar.pt"
    torch.save({"generator_config": dataclasses.asdict(gen.config), "model": gen.state_dict(), "name": "randar_G+R",
                "codes": {"kept": 36, "tokenizer_sha256": sha256_file(tokenizer)}}, path)
    return path, gen


def test_teacher_forced_predictions_argmax_and_samples():
    from generator_fixtures import tiny_generator
    from mergevq.generator.gpt import merge_codes
    from mergevq.train.recovery import teacher_forced_predictions

    gen = tiny_generator("randar-demo", grid=3, seq_len=9)
    codes, labels = torch.randint(0, 64, (4, 9)), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    want = merge_codes([lg.argmax(-1) for lg in gen.teacher_forced_logits(codes, labels)], gen.config.bits_split)
    torch.manual_seed(5)  # the same random slot order
    assert torch.equal(teacher_forced_predictions(gen, codes, labels, "argmax"), want)
    drawn = teacher_forced_predictions(gen, codes, labels, "sample")
    assert drawn.shape == (4, 9) and drawn.min() >= 0 and drawn.max() < 64


def test_finetune_for_generation_mixes_the_generators_codes(tmp_path, repo_root):
    cfg = yaml.safe_load(_config(tmp_path, repo_root, finetune_decoder=False).read_text())
    cfg["generator"]["recovery_randar"] = {"mix": 0.5, "predictions": "sample", "epochs": 1}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cfg = tmp_path / "cfg.yaml"
    tok = _tokenizer_file(tmp_path)
    assert _finetune(cfg, tok, tmp_path / "ft", max_steps=None) == 0
    gen, _ = _randar_file(tmp_path, tok, load_tokenizer(tok)[0].config.bits)
    init = tmp_path / "ft" / "model.pt"
    assert _finetune(cfg, tok, tmp_path / "a", generator=gen, init=init) == 0
    assert _finetune(cfg, tok, tmp_path / "b", max_steps=4, generator=gen, init=init) == 0
    assert _finetune(cfg, tok, tmp_path / "b", generator=gen, init=init) == 0
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=False) for d in "ab")
    assert all(torch.equal(a["recovery"][k], b["recovery"][k]) for k in a["recovery"])  # exact resume
    assert a["kept"] == 36 and a["generator_sha256"] and a["settings"]["mix"] == 0.5
    metrics = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    col = metrics[0].split(",").index("generated_code_changed")
    assert float(metrics[1].split(",")[col]) > 0  # the generator's draws differ from the real codes
    with pytest.raises(ValueError, match="not a RandAR generator"):
        _finetune(cfg, _tokenizer_file(tmp_path, seed=1), tmp_path / "c", generator=gen)


@pytest.mark.parametrize("finetune_decoder", [True, False])
def test_finetune_recovery_resumes_exactly_and_leaves_the_tokenizer_alone(tmp_path, repo_root, finetune_decoder):
    from mergevq.eval.fidelity import sha256_file

    cfg = _config(tmp_path, repo_root, finetune_decoder=finetune_decoder)
    tok = _tokenizer_file(tmp_path)
    before = sha256_file(tok)
    assert _finetune(cfg, tok, tmp_path / "a") == 0
    assert _finetune(cfg, tok, tmp_path / "b", max_steps=4) == 0 and not (tmp_path / "b" / "model.pt").exists()
    assert _finetune(cfg, tok, tmp_path / "b") == 0
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=False) for d in "ab")
    assert a["step"] == 11 and a["variant"] == "G+R" and a["tokenizer_sha256"] == before == sha256_file(tok)
    for part in ("recovery", "decoder"):
        if a[part] is None:
            assert not finetune_decoder and part == "decoder" and b[part] is None
            continue
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    model, _ = load_tokenizer(tok)
    trained = {k: v for k, v in a["recovery"].items()}
    assert any(not torch.equal(trained[k], v) for k, v in model.recovery.state_dict().items())  # it learned
    ft = load_recovery(tmp_path / "a" / "model.pt", model, before)
    assert ft.decoder_finetuned == finetune_decoder and (ft.decoder is model.decoder) != finetune_decoder
    val = (tmp_path / "a" / "val.csv").read_text().splitlines()
    assert val[0].startswith("step,source_accuracy,source_accuracy_argmax,psnr_gt_source,psnr_pred_source")
    metrics = (tmp_path / "a" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert ("recon_s_hat" in metrics) == finetune_decoder


def test_recovery_errors_name_the_cause(tmp_path, repo_root):
    from mergevq.config import ConfigError

    model = build_tokenizer("G+R-demo", **TINY)
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fine-tuned Source Recovery"):
        load_recovery(tmp_path / "other.pt", model)
    torch.save(recovery_artifact(model.recovery, None, variant="G+R", tokenizer_sha256="a" * 64), tmp_path / "r.pt")
    with pytest.raises(ValueError, match="fine-tuned on tokenizer sha256 aaaaaaaaaaaa"):
        load_recovery(tmp_path / "r.pt", model, "b" * 64)
    assert load_recovery(tmp_path / "r.pt", model, "a" * 64).decoder is model.decoder
    with pytest.raises(FileNotFoundError, match="stage-1 model.pt"):
        _finetune(_config(tmp_path, repo_root), tmp_path / "missing.pt", tmp_path / "out")
    from mergevq.train.recovery import check_settings, finetune_steps

    with pytest.raises(ConfigError, match="augment.fraction"):
        check_settings({"source_type": "bce", "augment": {"fraction": 0.0}})
    assert finetune_steps({"epochs": 3, "batch_size": 64}, 1437, "G") == 3 * 22
    assert finetune_steps({"epochs": {"G": 2, "R": 5}, "batch_size": 64}, 1437, "R") == 5 * 22
    with pytest.raises(ConfigError, match="no entry for variant 'G\\+R'"):
        finetune_steps({"epochs": {"G": 2}, "batch_size": 64}, 1437, "G+R")
    with pytest.raises(ConfigError, match="exceeds"):
        finetune_steps({"epochs": 1, "batch_size": 2048}, 1437, "G")
    with pytest.raises(ConfigError):  # the schema refuses an unknown key
        _finetune(_config(tmp_path, repo_root, warmup=3), _tokenizer_file(tmp_path), tmp_path / "out")


def test_evaluate_with_recovery_scores_the_finetuned_source(tmp_path, repo_root, monkeypatch, demo_weights):
    """An artefact holding the stage-1 recovery and no decoder must reproduce the stage-1 S_hat
    numbers in its *_ft keys; one with another decoder changes the reconstructions only."""
    from mergevq.config import load_config
    from mergevq.eval import tokenizer_eval as te
    from mergevq.eval.fidelity import sha256_file

    weights = demo_weights
    tok = _tokenizer_file(tmp_path)
    model, _ = load_tokenizer(tok)
    cfg = load_config(repo_root / "config" / "demo.yaml",
                      ["eval.fid.num_images=16", "eval.fid.batch_size=8", "eval.fid.bootstrap_resamples=5"])
    monkeypatch.setattr(te, "POSITION_BASELINE_IMAGES", 8)
    reference = te.reference_features(cfg, weights, progress=False)
    same = tmp_path / "same.pt"
    torch.save(recovery_artifact(model.recovery, None, variant="G+R", tokenizer_sha256=sha256_file(tok)), same)
    r = te.evaluate_tokenizer(cfg, tok, 36, reference, weights, device="cpu", progress=False, recovery=same)
    for key in ("psnr", "ssim", "classifier_top1_recon"):
        assert r[f"{key}_ft"] == pytest.approx(r[f"{key}_pred"])
    assert r["rfid_ft"]["value"] == pytest.approx(r["rfid_pred"]["value"])
    assert r["source_accuracy_ft"] == pytest.approx(r["source_accuracy"])
    assert r["recovery"]["decoder_finetuned"] is False
    torch.manual_seed(5)
    other = build_tokenizer("G+R-demo", **TINY).decoder
    torch.save(recovery_artifact(model.recovery, other, variant="G+R", tokenizer_sha256=sha256_file(tok)),
               tmp_path / "dec.pt")
    r2 = te.evaluate_tokenizer(cfg, tok, 36, reference, weights, device="cpu", progress=False,
                               recovery=tmp_path / "dec.pt")
    assert r2["source_accuracy_ft"] == pytest.approx(r["source_accuracy_ft"]) and r2["psnr_ft"] != r["psnr_ft"]
    assert r2["psnr_gt"] == pytest.approx(r["psnr_gt"])  # S keeps the tokenizer's decoder
    with pytest.raises(ValueError, match="fine-tuned on tokenizer"):
        te.evaluate_tokenizer(cfg, _tokenizer_file(tmp_path, seed=1), 36, reference, weights, device="cpu",
                              progress=False, recovery=same)
