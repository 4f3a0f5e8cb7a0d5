# Tables (ours beside the paper's numbers from results/paper/, with .md twins) and figures.

SWEEP_JSONS = [f"{OUT}/sweep/{v}/k{k}/metrics.json" for v in VARIANTS for k in config["tokenizer"]["variants"][v]["sweep"]]
PROBE_JSONS = [f"{OUT}/probe/{v}/k{k}/metrics.json" for v in VARIANTS for k in config["tokenizer"]["variants"][v]["sweep"]]
TARGET_SWEEP = [f"{OUT}/sweep/{v}/k{config['tokenizer']['variants'][v]['kept']}/metrics.json" for v in VARIANTS]
BASELINE_JSONS = [f"{OUT}/probe/baselines/random_{v}/metrics.json" for v in VARIANTS] + [
    f"{OUT}/probe/baselines/raw_pixels/metrics.json"
]
EXTRA_FEATURES = config["eval"]["linear_probe"].get("extra_features", [])
EXTRA_PROBE_JSONS = [
    f"{OUT}/probe/{v}/k{config['tokenizer']['variants'][v]['kept']}/{f}/metrics.json" for v in VARIANTS for f in EXTRA_FEATURES
] + [f"{OUT}/probe/baselines/random_{v}/{f}/metrics.json" for v in VARIANTS for f in EXTRA_FEATURES]
FINETUNE_JSONS = [f"{OUT}/finetune/{v}/metrics.json" for v in VARIANTS]
TOKENIZERS = [f"{OUT}/tokenizer/{v}/model.pt" for v in VARIANTS]
# What the tables' and figures' labels and notes read from the config (their numbers come from inputs).
REPORT_SETTINGS = config_hash({"run": RUN, "seed": config["seed"], "data": config["data"],
                               "tokenizer": config["tokenizer"], "probe": config["eval"]["linear_probe"]})
# Table 4's per-K protocol, for the variants with `train_per_kept: true`: one tokenizer per K of the
# sweep; at the variant's own target K that tokenizer is the main one (same settings), not retrained.
PER_KEPT_JSONS = [
    f"{OUT}/per_kept/{v}/k{k}/{name}.json"
    for v, var in config["tokenizer"]["variants"].items() if var.get("train_per_kept")
    for k in var["sweep"] if k != var["kept"]
    for name in ("metrics", "probe")
]
TABLE_INPUTS = {
    "table1": [f"{OUT}/probe/{v}/k{config['tokenizer']['variants'][v]['kept']}/metrics.json" for v in VARIANTS]
    + BASELINE_JSONS
    + EXTRA_PROBE_JSONS
    + FINETUNE_JSONS,
    "table2": TARGET_SWEEP,
    "table4": SWEEP_JSONS + PROBE_JSONS + PER_KEPT_JSONS,
    "table3": GENERATION_METRICS,  # workflow/rules/generator.smk: final samples of each (generator, variant)
    "table5": TARGET_SWEEP + GENERATION_METRICS,
}


rule table:
    input:
        lambda wc: TABLE_INPUTS[wc.table],
    output:
        csv=report(f"{OUT}/tables/{{table}}.csv", caption="../report/table.rst", category="Tables",
                   labels={"table": "{table}"}),
        md=f"{OUT}/tables/{{table}}.md",
    wildcard_constraints:
        table="|".join(TABLE_INPUTS),
    params:
        settings=REPORT_SETTINGS,
    log:
        f"{OUT}/logs/tables/{{table}}.log",
    benchmark:
        f"{OUT}/benchmarks/tables/{{table}}.tsv"
    resources:
        **res("cpu_rule"),
    shell:
        "mergevq table {wildcards.table} --config \"$MERGEVQ_CONFIG\" --inputs {input} --out {output.csv} > {log} 2>&1"


rule figure_tradeoff:
    input:
        SWEEP_JSONS + PROBE_JSONS,
    output:
        report(f"{OUT}/figures/fig3_tradeoff.png", caption="../report/fig3.rst", category="Figures"),
    params:
        settings=REPORT_SETTINGS,
    log:
        f"{OUT}/logs/figures/fig3.log",
    resources:
        **res("cpu_rule"),
    shell:
        "mergevq figure fig3_tradeoff --config \"$MERGEVQ_CONFIG\" --inputs {input} --out {output} > {log} 2>&1"


rule figure_merge_sampling:
    output:
        report(f"{OUT}/figures/fig5_merge_sampling.png", caption="../report/fig5.rst", category="Figures"),
    params:
        settings=config_hash({v: config["tokenizer"]["variants"][v]["merge_sampling"] for v in VARIANTS}),
    log:
        f"{OUT}/logs/figures/fig5.log",
    resources:
        **res("cpu_rule"),
    shell:
        "mergevq figure fig5_merge_sampling --config \"$MERGEVQ_CONFIG\" --out {output} > {log} 2>&1"


# Fig. 4 shows the G+R tokenizer, as the paper's does (the first variant if the config has no G+R).
MERGE_MAP_VARIANT = "G+R" if "G+R" in VARIANTS else VARIANTS[0]


rule figure_merge_maps:
    input:
        f"{OUT}/tokenizer/{MERGE_MAP_VARIANT}/model.pt",
    output:
        report(f"{OUT}/figures/fig4_merge_maps.png", caption="../report/fig4_merge_maps.rst", category="Figures"),
    params:
        settings=REPORT_SETTINGS,
    log:
        f"{OUT}/logs/figures/fig4_merge_maps.log",
    resources:
        **res("eval_rule"),
    shell:
        "mergevq figure fig4_merge_maps --config \"$MERGEVQ_CONFIG\" --tokenizers {input} --out {output} > {log} 2>&1"


rule figure_reconstructions:
    input:
        tokenizers=TOKENIZERS,
        recoveries=[f"{OUT}/tokenizer/{v}/recovery/model.pt" for v in VARIANTS],
    output:
        report(f"{OUT}/figures/figA1_reconstructions.png", caption="../report/figA1_reconstructions.rst", category="Figures"),
    params:
        settings=REPORT_SETTINGS,
    log:
        f"{OUT}/logs/figures/figA1_reconstructions.log",
    resources:
        **res("eval_rule"),
    shell:
        "mergevq figure figA1_reconstructions --config \"$MERGEVQ_CONFIG\" --tokenizers {input.tokenizers} "
        "--recoveries {input.recoveries} --out {output} > {log} 2>&1"


rule figure_samples:
    input:
        samples=FINAL_SAMPLES,
        metrics=GENERATION_METRICS,
    output:
        report(f"{OUT}/figures/figA2_samples.png", caption="../report/figA2_samples.rst", category="Figures"),
    params:
        folders=lambda wc, input: " ".join(str(Path(f).parent) for f in input.samples),
    log:
        f"{OUT}/logs/figures/figA2_samples.log",
    resources:
        **res("cpu_rule"),
    shell:
        "mergevq figure figA2_samples --config \"$MERGEVQ_CONFIG\" --samples {params.folders} --out {output} > {log} 2>&1"
