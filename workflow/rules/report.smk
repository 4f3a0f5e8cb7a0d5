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
TABLE_INPUTS = {
    "table1": [f"{OUT}/probe/{v}/k{config['tokenizer']['variants'][v]['kept']}/metrics.json" for v in VARIANTS]
    + BASELINE_JSONS
    + EXTRA_PROBE_JSONS
    + FINETUNE_JSONS,
    "table2": TARGET_SWEEP,
    "table4": SWEEP_JSONS + PROBE_JSONS,
    "table5": TARGET_SWEEP,
}


rule table:
    input:
        lambda wc: TABLE_INPUTS[wc.table],
    output:
        csv=f"{OUT}/tables/{{table}}.csv",
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
        TOKENIZERS,
    output:
        report(f"{OUT}/figures/figA1_reconstructions.png", caption="../report/figA1_reconstructions.rst", category="Figures"),
    params:
        settings=REPORT_SETTINGS,
    log:
        f"{OUT}/logs/figures/figA1_reconstructions.log",
    resources:
        **res("eval_rule"),
    shell:
        "mergevq figure figA1_reconstructions --config \"$MERGEVQ_CONFIG\" --tokenizers {input} --out {output} > {log} 2>&1"
