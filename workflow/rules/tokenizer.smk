# Stage 1: one MergeVQ tokenizer per variant (Table A1), after the offline SSL alignment teacher
# where the config uses one (`tokenizer.loss.teacher: ssl`). The rule declares only model.pt, written
# when training completes; the resumable DIR/last.ckpt beside it is undeclared, because Snakemake
# deletes the declared outputs of a failed job and a preempted job must resume, not restart.


rule train_ssl_teacher:
    output:
        model=SSL_TEACHER,
    params:
        outdir=lambda wc: str(Path(SSL_TEACHER).parent),
        settings=config_hash({"ssl_teacher": config["tokenizer"].get("ssl_teacher"), "data": config["data"],
                              "seed": config["seed"]}),
    log:
        f"{OUT}/logs/train_ssl_teacher.log",
    benchmark:
        f"{OUT}/benchmarks/train_ssl_teacher.tsv"
    priority: 20  # every tokenizer waits for it
    resources:
        **res("gpu_rule"),
    shell:
        "mergevq train-ssl-teacher --config \"$MERGEVQ_CONFIG\" --out {params.outdir} > {log} 2>&1"


rule train_tokenizer:
    input:
        teacher=ssl_teacher_for,
    output:
        model=f"{OUT}/tokenizer/{{variant}}/model.pt",
    params:
        outdir=lambda wc: f"{OUT}/tokenizer/{wc.variant}",
        settings=lambda wc: variant_hash(wc.variant),
        launch=launch("gpu_rule"),
        teacher=lambda wc, input: f"--teacher {input.teacher}" if input.teacher else "",
    log:
        f"{OUT}/logs/train_tokenizer/{{variant}}.log",
    benchmark:
        f"{OUT}/benchmarks/train_tokenizer/{{variant}}.tsv"
    priority: 10  # the longest jobs of the DAG: start them before the evaluation rules
    resources:
        **res("gpu_rule"),
    shell:
        "{params.launch} train-tokenizer --config \"$MERGEVQ_CONFIG\" --variant '{wildcards.variant}' "
        "--out {params.outdir} {params.teacher} > {log} 2>&1"
