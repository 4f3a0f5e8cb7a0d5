"""The HTML report and targeted reruns, on a real (reduced) run of the whole `all` DAG.

The reduced config (tests/slurm/reduced_config.py: config/demo.yaml with one variant, two kept
counts, a few training steps) runs locally in a temporary working directory, then
`snakemake --report` builds the report exactly as `make demo` does. Checks: every table and figure
of the run is in the report with a caption; every embedded figure decodes to a non-uniform image
and their number equals the figures the run made; headless Chromium (Debian's `chromium`) opens the
report, navigates to a figure and shows it. Then the README's per-table/figure targets: a changed
input reruns only what depends on it, and from nothing each target plans only its own dependencies.
"""
from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
import harness  # noqa: E402
from harness import REPO  # noqa: E402
from reduced_config import VARIANT, reduced_config  # noqa: E402

RUN = "reduced"


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
    """The whole `all` DAG of the reduced config, run locally (2 cores), then its report.
    MERGEVQ_TEST_REDUCED_RUN=DIR runs it in DIR instead, incrementally (development reruns)."""
    root = Path(os.environ.get("MERGEVQ_TEST_REDUCED_RUN") or tmp_path_factory.mktemp("reduced_run"))
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    cfg = root / "reduced.yaml"
    cfg.write_text(yaml.safe_dump(reduced_config(), sort_keys=False))
    run = harness.snakemake(work, cfg, "all", "--cores", "2", timeout=2400, log=root / "run.log")
    assert run.returncode == 0, harness.tail(run.stdout + run.stderr)
    report = work / "report.html"
    rep = harness.snakemake(work, cfg, "all", "--report", str(report), timeout=600, log=root / "report.log")
    assert rep.returncode == 0, harness.tail(rep.stdout + rep.stderr)
    return work, cfg, report


def report_results(report: Path) -> dict:
    """The report's embedded `results` object: path -> {caption, mime_type, data_uri, ...}."""
    html = report.read_text()
    match = re.search(r'<script id="results">\s*var results = (\{.*?\});\s*</script>', html, re.S)
    assert match, "no results object in the report"
    return json.loads(match.group(1))


def decode_png(data_uri: str) -> np.ndarray:
    header, payload = data_uri.split(",", 1)
    assert header.startswith("data:image/png") and header.endswith(";base64"), header[:80]
    with Image.open(io.BytesIO(base64.b64decode(payload))) as img:
        return np.asarray(img.convert("RGB"))


def test_report_holds_every_table_and_figure_with_its_caption(reduced_run):
    work, _, report = reduced_run
    results = report_results(report)
    out = work / "results" / RUN
    made = {str(p.relative_to(work)) for p in (out / "figures").glob("*.png")} | \
           {str(p.relative_to(work)) for p in (out / "tables").glob("*.csv")}
    assert made and set(results) == made
    for path, entry in results.items():
        caption = re.sub(r"<[^>]+>", "", entry["caption"]).strip()
        assert len(caption) > 60, (path, caption)
        assert "no caption yet" not in caption, path
        if path.endswith(".csv"):
            assert entry["mime_type"] == "text/csv"
            table = Path(path).stem
            assert f"tables/{table}.md" in caption  # points at the protocol notes
            csv = base64.b64decode(entry["data_uri"].split(",", 1)[1]).decode()
            assert csv == (work / path).read_text()


def test_report_figures_decode_to_non_uniform_images(reduced_run):
    work, _, report = reduced_run
    figures = {p: e for p, e in report_results(report).items() if e["mime_type"].startswith("image/")}
    assert len(figures) == len(list((work / "results" / RUN / "figures").glob("*.png")))
    for path, entry in figures.items():
        pixels = decode_png(entry["data_uri"])
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100, (path, pixels.shape)
        assert pixels.std() > 5 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 16, path
        with Image.open(work / path) as on_disk:
            assert on_disk.size == (pixels.shape[1], pixels.shape[0])


NAVIGATE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const path = %s;
  app.setView({navbarMode: "resultinfo", content: "img", contentPath: results[path].data_uri, resultPath: path});
  setTimeout(() => {
    const img = document.querySelector('img[src^="data:image/png"]');
    document.title = img && img.complete && img.naturalWidth ? ("figure " + img.naturalWidth + "x" + img.naturalHeight)
                                                              : "no figure shown";
  }, 1000);
}, 500));
</script>
"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=15000", *args], capture_output=True, text=True, timeout=180)


def test_report_opens_in_headless_chromium_on_a_figure(reduced_run, tmp_path):
    """The report is a single-page app (its landing page is never blank): the page is opened with
    a script appended that clicks through to Fig. 4 as the menu would (app.setView), and the figure
    must be displayed, decoded by the browser at its own size."""
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        if os.environ.get("MERGEVQ_REQUIRE_CHROMIUM") == "1":
            pytest.fail("MERGEVQ_REQUIRE_CHROMIUM=1 but chromium is not installed")
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    work, _, report = reduced_run
    figure = f"results/{RUN}/figures/fig4_merge_maps.png"
    html = report.read_text()
    cut = html.rfind("</body>")
    page = tmp_path / "report_fig4.html"
    page.write_text(html[:cut] + NAVIGATE % json.dumps(figure) + html[cut:])

    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    with Image.open(work / figure) as img:
        width, height = img.size
    assert f"<title>figure {width}x{height}</title>" in dom.stdout, re.findall(r"<title>.*?</title>", dom.stdout)
    assert "Merge maps (paper Fig. 4)" in dom.stdout  # its caption, in the side panel

    shots = {}
    for name, url in (("figure", page.as_uri()), ("landing", report.as_uri())):
        shot = tmp_path / f"{name}.png"
        res = chromium("--window-size=1400,1000", f"--screenshot={shot}", url)
        assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
        with Image.open(shot) as img:
            shots[name] = np.asarray(img.convert("RGB")).astype(np.int16)
    assert shots["figure"].std() > 5
    assert np.abs(shots["figure"] - shots["landing"]).mean() > 5  # the figure view is not the landing page


# ---- targeted reruns ---------------------------------------------------------------------------------
def planned(work: Path, cfg: Path, target: str) -> list[tuple[str, list[str]]]:
    res = harness.snakemake(work, cfg, "-n", target, timeout=300)
    assert res.returncode == 0, harness.tail(res.stdout + res.stderr)
    return harness.dry_run_jobs(res.stdout)


def test_changed_input_reruns_only_what_depends_on_it(reduced_run):
    """After the full run, a rewritten sweep point (K = 16, not the target K = 36) makes Table 4 and
    Fig. 3 stale and nothing else: Table 2's target plans no job, Table 4's plans one. (The file is
    rewritten with a trailing newline, same data: Snakemake skips an input whose mtime alone changed.)"""
    work, cfg, _ = reduced_run
    out = f"results/{RUN}"
    assert planned(work, cfg, "all") == []
    point = work / out / f"sweep/{VARIANT}/k16/metrics.json"
    point.write_text(point.read_text() + "\n")
    assert planned(work, cfg, f"{out}/tables/table2.csv") == []
    jobs = planned(work, cfg, f"{out}/tables/table4.csv")
    assert [(rule, outputs[0]) for rule, outputs in jobs] == [("table", f"{out}/tables/table4.csv")]
    stale = sorted(outputs[0] for _, outputs in planned(work, cfg, "all") if outputs)
    assert stale == [f"{out}/figures/fig3_tradeoff.png", f"{out}/tables/table4.csv"]


@functools.lru_cache(maxsize=1)
def demo_products() -> list[str]:
    """Every table (.csv) and figure of the demo's `all`, relative to results/demo/."""
    res = subprocess.run([harness.SNAKEMAKE, "-n", "all", "--configfile", "config/demo.yaml", "--cores", "1",
                          "--forceall"], cwd=REPO, env=harness.env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, harness.tail(res.stdout + res.stderr)
    outs = {o for _, outputs in harness.dry_run_jobs(res.stdout) for o in outputs}
    return sorted(o.removeprefix("results/demo/") for o in outs
                  if re.fullmatch(r"results/demo/(tables/\w+\.csv|figures/\w+\.png)", o))


def test_readme_names_a_target_for_every_table_and_figure():
    named = set(re.findall(r"results/imagenet/((?:tables|figures)/\w+\.(?:csv|png))", (REPO / "README.md").read_text()))
    products = demo_products()
    assert len(products) >= 8
    assert set(products) <= named, f"README.md names no target for {sorted(set(products) - named)}"


# Jobs a target must not plan: evidence that it builds only what it depends on.
NOT_PLANNED = {
    "tables/table1.csv": {"evaluate_tokenizer", "reference_features", "train_generator", "figure_tradeoff"},
    "tables/table2.csv": {"linear_probe", "linear_probe_features", "finetune", "train_generator", "extract_codes"},
    "tables/table4.csv": {"finetune", "linear_probe_random_init", "train_generator", "extract_codes"},
    "figures/fig3_tradeoff.png": {"finetune", "linear_probe_raw_pixels", "train_generator"},
    "figures/fig4_merge_maps.png": {"evaluate_tokenizer", "linear_probe", "demo_classifier", "train_generator"},
    "figures/figA1_reconstructions.png": {"evaluate_tokenizer", "linear_probe", "train_generator"},
}
EXACTLY = {
    "figures/fig5_merge_sampling.png": {"figure_merge_sampling"},
    "figures/fig4_merge_maps.png": {"train_ssl_teacher", "train_tokenizer", "figure_merge_maps"},
}


@pytest.mark.parametrize("target", sorted(set(NOT_PLANNED) | set(EXACTLY) | {"tables/table3.csv", "tables/table5.csv",
                                                                             "figures/figA2_samples.png"}))
def test_each_target_plans_only_its_own_dependencies(target, tmp_path):
    """From an empty results folder (demo config): the README's target for one table or figure plans
    no other table or figure, and none of the jobs it does not depend on."""
    if target not in demo_products():
        pytest.skip(f"the demo DAG has no {target}")
    jobs = planned(tmp_path, REPO / "config" / "demo.yaml", f"results/demo/{target}")
    rules = {rule for rule, _ in jobs}
    finals = sorted(o for _, outputs in jobs for o in outputs if "/tables/" in o or "/figures/" in o)
    assert finals == sorted([f"results/demo/{target}"] + ([f"results/demo/{target[:-4]}.md"] if target.endswith(".csv") else []))
    assert not rules & NOT_PLANNED.get(target, set()), rules & NOT_PLANNED[target]
    if target in EXACTLY:
        assert rules == EXACTLY[target]
    if target == "figures/fig4_merge_maps.png":  # one tokenizer: the variant Fig. 4 shows
        assert [o for r, outs in jobs if r == "train_tokenizer" for o in outs] == ["results/demo/tokenizer/G+R/model.pt"]
