# Tables (ours beside the paper's numbers from results/paper/, with .md twins) and figures.

SWEEP_JSONS = [f"{OUT}/sweep/{v}/k{k}/metrics.json" for v in VARIANTS for k in config["tokenizer"]["variants"][v]["sweep"]]
PROBE_JSONS = [f"{OUT}/probe/{v}/k{k}/metrics.json" for v in VARIANTS for k in config["tokenizer"]["variants"][v]["sweep"]]
TARGET_SWEEP = [f"{OUT}/sweep/{v}/k{config['tokenizer']['variants'][v]['kept']}/metrics.json" for v in VARIANTS]
BASELINE_JSONS = [f"{OUT}/probe/baselines/random_{v}/metrics.json" for v in VARIANTS] + [
    f"{OUT}/probe/baselines/raw_pixels/metrics.json"
]
FINETUNE_JSONS = [f"{OUT}/finetune/{v}/metrics.json" for v in VARIANTS]
TOKENIZERS = [f"{OUT}/tokenizer/{v}/model.pt" for v in VARIANTS]
TABLE_INPUTS = {
    "table1": [f"{OUT}/probe/{v}/k{config['tokenizer']['variants'][v]['kept']}/metrics.json" for v in VARIANTS]
    + BASELINE_JSONS
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
        config=str(RESOLVED),
    log:
        f"{OUT}/logs/tables/{{table}}.log",
    benchmark:
        f"{OUT}/benchmarks/tables/{{table}}.tsv"
    resources:
        **res("cpu_rule"),
    shell:
        "mergevq table {wildcards.table} --config {params.config} --inputs {input} --out {output.csv} > {log} 2>&1"


rule figure_tradeoff:
    input:
        SWEEP_JSONS + PROBE_JSONS,
    output:
        report(f"{OUT}/figures/fig3_tradeoff.png", caption="../report/fig3.rst", category="Figures"),
    params:
        config=str(RESOLVED),
    log:
        f"{OUT}/logs/figures/fig3.log",
    resources:
        **res("cpu_rule"),
    shell:
        "mergevq figure fig3_tradeoff --config {params.config} --inputs {input} --out {output} > {log} 2>&1"


rule figure_merge_sampling:
    output:
        report(f"{OUT}/figures/fig5_merge_sampling.png", caption="../report/fig5.rst", category="Figures"),
    params:
        config=str(RESOLVED),
        settings=config_hash({v: config["tokenizer"]["variants"][v]["merge_sampling"] for v in VARIANTS}),
    log:
        f"{OUT}/logs/figures/fig5.log",
    resources:
        **res("cpu_rule"),
    shell:
        "mergevq figure fig5_merge_sampling --config {params.config} --out {output} > {log} 2>&1"


rule figure_from_tokenizers:
    input:
        TOKENIZERS,
    output:
        report(f"{OUT}/figures/{{fig}}.png", caption="../report/{fig}.rst", category="Figures"),
    wildcard_constraints:
        fig="fig4_merge_maps|figA1_reconstructions",
    params:
        config=str(RESOLVED),
    log:
        f"{OUT}/logs/figures/{{fig}}.log",
    resources:
        **res("eval_rule"),
    shell:
        "mergevq figure {wildcards.fig} --config {params.config} --tokenizers {input} --out {output} > {log} 2>&1"
