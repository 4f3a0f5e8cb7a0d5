"""`mergevq bench`'s own helpers: the MergeAR FLOP model against torch's flop_counter, the dense
LFQ reference against the exact entropies, the timing statistics, the Snakemake summary parser,
the memory probe, and the JSON keys of a tiny run. No timing is asserted."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mergevq import cli
from mergevq.bench import KEYS, BenchError, cpu_threads, resolve_device
from mergevq.bench.lfq import dense_entropies, make_z, ours_entropies
from mergevq.bench.mergear import decode_flops, keys_per_step, kv_cache_bytes
from mergevq.bench.memory import measure, peak_memory
from mergevq.bench.report import Goal
from mergevq.bench.scale import SCALES
from mergevq.bench.timing import alternate, lockstep, paired_ratio, ratio, summarize, top_events
from mergevq.bench.workflow import parse_summary
from mergevq.eval.flops import _EXTRA_FORMULAS
from mergevq.generator import build_generator
from mergevq.generator.mergear import PREFIX_LEN


def tiny_mergear(**kw):
    torch.manual_seed(0)
    cfg = dict(n_layer=2, dim=32, n_head=2, n_intra_layer=2, codebook_bits=6, num_classes=3, grid=4)
    return build_generator("mergear-demo", **{**cfg, **kw}).eval()


def duplicated_codes(batch: int, length: int, distinct: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, distinct, (batch, length), generator=gen)


@pytest.mark.parametrize("prune", [True, False])
def test_decode_flop_model_equals_flop_counter(prune):
    model = tiny_mergear()
    codes = duplicated_codes(3, model.config.num_tokens, 5)  # many duplicates: the pruned cache matters
    labels = torch.tensor([0, 1, 2])
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with counter:
        out = model.generate_with_stats(labels, kept=6, force=codes, prune_cache=prune)
    predicted = decode_flops(model.config, 3, keys_per_step(out.stats, prune))
    assert predicted == counter.get_total_flops()


def test_pruned_decode_reads_fewer_keys_and_flop_model_predicts_a_speedup():
    model = tiny_mergear()
    codes = duplicated_codes(2, model.config.num_tokens, 3)
    labels = torch.tensor([0, 1])
    pruned = model.generate_with_stats(labels, kept=4, force=codes, prune_cache=True)
    full = model.generate_with_stats(labels, kept=4, force=codes, prune_cache=False)
    kp, kf = keys_per_step(pruned.stats, True), keys_per_step(full.stats, False)
    n = model.config.num_tokens
    assert kf == list(range(PREFIX_LEN + 1, PREFIX_LEN + n))
    assert all(a <= b for a, b in zip(kp, kf)) and max(kp) <= PREFIX_LEN + 4 + 1
    assert decode_flops(model.config, 2, kf) > decode_flops(model.config, 2, kp)
    with pytest.raises(ValueError, match="cached steps"):
        decode_flops(model.config, 2, kf[:-1])


def test_kv_cache_bytes_is_what_the_cache_allocates():
    model = tiny_mergear()
    cache = model.new_cache(3, 11)
    held = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert kv_cache_bytes(model.config, 3, 11, torch.float32) == held


def test_dense_lfq_reference_matches_exact_entropies_and_gradients():
    z = make_z(2, 16, 8, "cpu")
    dense = dense_entropies(z)
    g_dense = torch.autograd.grad(dense[0] - dense[1], z)[0]
    ours = ours_entropies(z)
    g_ours = torch.autograd.grad(ours[0] - ours[1], z)[0]
    for a, b in zip(dense, ours):
        assert abs(float(a.detach()) - float(b.detach())) < 1e-5
    assert torch.allclose(g_dense, g_ours, atol=1e-5, rtol=1e-4)
    assert torch.equal(make_z(1, 16, 8, "cpu"), make_z(2, 16, 8, "cpu")[:1])  # the dense subset is a prefix


def test_summarize_and_ratio():
    t = summarize([3.0, 1.0, 2.0])
    assert (t.median, t.low, t.high) == (2.0, 1.0, 3.0)
    r = ratio(summarize([4.0, 2.0]), summarize([1.0, 2.0]))
    assert (r.value, r.low, r.high) == (2.0, 1.0, 4.0)
    with pytest.raises(ValueError, match="pairs"):
        ratio(summarize([1.0]), summarize([1.0, 2.0]))
    with pytest.raises(ValueError):
        summarize([])


def test_alternate_warms_up_then_alternates_order():
    calls = []
    sides = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = alternate(sides, repeats=3, device=torch.device("cpu"), warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert all(len(t.samples) == 3 for t in times.values())


def test_alternate_budget_sets_the_round_count_between_min_and_max():
    from mergevq.bench.scale import Repeats

    sides = {"a": lambda: None, "b": lambda: None}
    cpu = torch.device("cpu")
    assert len(alternate(sides, Repeats(2, 5, 1e9), cpu)["a"].samples) == 5  # budget allows all
    assert len(alternate(sides, Repeats(2, 5, 0.0), cpu)["a"].samples) == 2  # budget allows none
    assert len(alternate(sides, Repeats(3, 3, 1e9), cpu, warmup=0)["b"].samples) == 3
    with pytest.raises(ValueError):
        alternate(sides, Repeats(3, 2, 1.0), cpu)


class _Step(torch.nn.Module):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def forward(self, side):
        self.log.append(side)


def test_lockstep_alternates_sides_step_by_step():
    log = []
    step = _Step(log)

    def side(name, n):
        def run():
            for _ in range(n):
                step(name)
            return name.upper()
        return run

    segments, results = lockstep({"a": side("a", 4), "b": side("b", 6)}, step, torch.device("cpu"))
    assert log == ["a", "b"] * 4 + ["b", "b"]  # strict alternation while both run, then b alone
    assert results == {"a": "A", "b": "B"}
    assert [len(segments["a"]), len(segments["b"])] == [5, 7]  # one segment per step + the tail
    step("main")  # the hook is gone
    assert log[-1] == "main"


def test_lockstep_reraises_a_side_error():
    step = _Step([])

    def bad():
        step("bad")
        raise RuntimeError("side failed")

    def good():
        for _ in range(3):
            step("good")

    with pytest.raises(RuntimeError, match="side failed"):
        lockstep({"bad": bad, "good": good}, step, torch.device("cpu"))


def test_paired_ratio():
    r = paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert (r.value, r.low, r.high) == pytest.approx((2.0, 2.0, 2.0))
    r = paired_ratio([1.0, 3.0, 1.0, 3.0], [1.0, 1.0, 1.0, 1.0])
    assert r.low <= r.value == 2.0 <= r.high
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_top_events_match_torch_key_averages():
    from torch.profiler import ProfilerActivity, profile

    model = tiny_mergear(grid=2)
    codes, labels = duplicated_codes(2, 4, 2), torch.tensor([0, 1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.generate_with_stats(labels, kept=2, force=codes)
    ours = {e["op"]: e for e in top_events(prof, torch.device("cpu"), rows=1000)}
    torch_avg = {e.key: e for e in prof.key_averages() if e.self_cpu_time_total > 0}
    assert set(torch_avg) <= set(ours)
    for name, e in torch_avg.items():
        assert ours[name]["calls"] >= e.count  # torch merges an op with its own overload nested alone
        assert ours[name]["self_ms"] == pytest.approx(e.self_cpu_time_total / 1e3, abs=2e-3)
    assert sum(e["share"] for e in ours.values()) == pytest.approx(1.0)


def test_goal():
    assert Goal("x", 3.0, ">=", 2.0, "").met and not Goal("x", 1.0, ">=", 2.0, "").met
    assert Goal("x", 1.0, "<=", 2.0, "").met and not Goal("x", float("nan"), "<=", 2.0, "").met
    with pytest.raises(ValueError, match="op"):
        Goal("x", 1.0, "==", 1.0, "")


def test_parse_summary():
    text = ("Building DAG of jobs...\noutput_file\tdate\trule\tlog-file(s)\tstatus\tplan\n"
            "results/demo/tables/table1.csv\t-\ttable\t-\tmissing\tupdate pending\n"
            "results/demo/a b/model.pt\t-\ttrain\t-\tmissing\tupdate pending\n")
    assert parse_summary(text) == ["results/demo/tables/table1.csv", "results/demo/a b/model.pt"]
    with pytest.raises(ValueError, match="output_file"):
        parse_summary("nothing here")


def test_memory_probe_sees_a_large_allocation():
    small = measure("mergevq.bench.lfq:side", dict(kind="ours", images=1, tokens=8, bits=6), "cpu")
    assert small["peak_bytes"] >= 0
    big = peak_memory("mergevq.bench.lfq:side", dict(kind="dense", images=1, tokens=64, bits=16), "cpu",
                      warmup_kwargs=dict(kind="dense", images=1, tokens=2, bits=16))
    assert big["resolved"] and big["peak_bytes"] > 64 * 2**16 * 4  # at least one (64, 2^16) fp32 tensor


def test_cuda_mode_fails_clearly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(BenchError, match="cuda"):
        resolve_device("cuda")
    assert cli.main(["bench", "--device", "cuda", "--only", "lfq"]) == 1


def test_tiny_run_writes_every_key(tmp_path, monkeypatch):
    # the tiny scale with single repeats; the workflow item (Snakemake, ~15 s) is covered by
    # tests/test_workflow_config.py's real DAG runs and test_parse_summary
    tiny = dataclasses.replace(SCALES["tiny"], lfq_repeats=1, tome_variants=("R-demo",))
    monkeypatch.setitem(SCALES, "tiny", tiny)
    # in this process (a subprocess per side is test_memory_probe_sees_a_large_allocation's)
    monkeypatch.setattr("mergevq.bench.lfq.peak_memory", measure)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--scale", "tiny", "--only", "lfq", "tome", "mergear", "train", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for item in ("lfq", "tome", "mergear", "train"):
        for key in KEYS[item]:
            assert report[key] is not None, key
        assert report["items"][item]["elapsed_s"] > 0 and report["items"][item]["cpu_s"] > 0
    assert set(report["tome_efficiency"]) == {"R-demo"}
    assert report["lfq_entropy_abs_diff"] < 1e-4
    assert report["items"]["mergear"]["codes"]["duplicate_share"] > 0  # merging made real duplicates
    assert {"lfq_memory_ratio", "train_mfu", "mergear_kv_ratio"} <= set(report["goals"])


def test_a_failing_item_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    from mergevq.bench.report import ItemResult

    def fake_run_item(name, scale, device, compile_):
        if name == "lfq":
            raise RuntimeError("boom")
        if name == "mergear":
            raise ImportError("no MergeAR yet", name="mergevq.generator.mergear")
        return ItemResult({"dag_noop_s": 1.5}, {}, [Goal("dag_noop_s", 1.5, "<=", 10.0, "")])

    monkeypatch.setattr("mergevq.bench.run_item", fake_run_item)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    assert cli.main(["bench", "--scale", "tiny", "--threads", "1", "--only", "lfq", "mergear", "workflow",
                     "--json", str(out)]) == 1
    assert torch.get_num_threads() == threads  # restored
    report = json.loads(out.read_text())
    assert report["items"]["lfq"]["error"] == "RuntimeError: boom" and report["lfq_memory_ratio"] is None
    assert "mergevq.generator.mergear" in report["items"]["mergear"]["skipped"]
    assert report["mergear_speedup"] is None
    assert report["dag_noop_s"] == 1.5 and report["goals"]["dag_noop_s"]["met"]
    assert report["items"]["workflow"]["repeats"]["min"] == SCALES["tiny"].dag_repeats.min
    assert report["machine"]["torch_threads"] == 1


def test_every_item_states_its_budget_and_repeats():
    from mergevq.bench import ITEMS

    for scale in SCALES.values():
        assert set(scale.budget_s) == set(ITEMS)
        for item in ITEMS:
            assert scale.stated_repeats(item)
    full = SCALES["full"]
    assert sum(full.budget_s.values()) < 15 * 60  # the limit on 2 CPU cores
    with pytest.raises(BenchError, match="threads"):
        cpu_threads(0)
    assert cpu_threads(None) >= 1 and cpu_threads(3) == 3
