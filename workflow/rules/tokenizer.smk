# Stage 1: one MergeVQ tokenizer per variant (Table A1). The rule declares only model.pt, written
# when training completes; the resumable DIR/last.ckpt beside it is undeclared, because Snakemake
# deletes the declared outputs of a failed job and a preempted job must resume, not restart.


rule train_tokenizer:
    output:
        model=f"{OUT}/tokenizer/{{variant}}/model.pt",
    params:
        config=str(RESOLVED),
        outdir=lambda wc: f"{OUT}/tokenizer/{wc.variant}",
        settings=lambda wc: variant_hash(wc.variant),
        launch=launch("gpu_rule"),
    log:
        f"{OUT}/logs/train_tokenizer/{{variant}}.log",
    benchmark:
        f"{OUT}/benchmarks/train_tokenizer/{{variant}}.tsv"
    priority: 10  # the longest jobs of the DAG: start them before the evaluation rules
    resources:
        **res("gpu_rule"),
    shell:
        "{params.launch} train-tokenizer --config {params.config} --variant '{wildcards.variant}' "
        "--out {params.outdir} > {log} 2>&1"
