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
        **resumable("gpu_rule"),
    shell:
        resumable_shell("mergevq train-ssl-teacher --config \"$MERGEVQ_CONFIG\" --out {params.outdir}")


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
        **resumable("gpu_rule"),
    shell:
        resumable_shell("{params.launch} train-tokenizer --config \"$MERGEVQ_CONFIG\" --variant '{wildcards.variant}' "
                        "--out {params.outdir} {params.teacher}")


# Source Recovery fine-tuned on the frozen tokenizer (App. A.2, Table A2): RandAR decodes with its
# S_hat, and `evaluate --recovery` scores it (Table 5's "fine-tuned Source Recovery" row). Its own
# directory: the loop's last.ckpt / metrics.csv there never mix with the stage-1 run's.
rule finetune_recovery:
    input:
        tokenizer=f"{OUT}/tokenizer/{{variant}}/model.pt",
    output:
        model=f"{OUT}/tokenizer/{{variant}}/recovery/model.pt",
    params:
        outdir=lambda wc: f"{OUT}/tokenizer/{wc.variant}/recovery",
        settings=lambda wc: config_hash({"recovery_finetune": config["generator"]["recovery_finetune"],
                                         "variant": variant_config(config, wc.variant), "data": config["data"],
                                         "seed": config["seed"]}),
        launch=launch("gpu_rule"),
    log:
        f"{OUT}/logs/finetune_recovery/{{variant}}.log",
    benchmark:
        f"{OUT}/benchmarks/finetune_recovery/{{variant}}.tsv"
    priority: 10
    resources:
        **resumable("gpu_rule"),
    shell:
        resumable_shell("{params.launch} finetune-recovery --config \"$MERGEVQ_CONFIG\" --tokenizer {input.tokenizer} "
                        "--out {params.outdir}")


# Table 4's other protocol ("with the number of kept tokens during training"): one tokenizer per K of
# the sweep, its merge-ratio sampler moved to sit around that K (`train-tokenizer --kept K`), for the
# variants with `train_per_kept: true` (off in both configs: 6-8 full stage-1 trainings per variant).
rule train_tokenizer_at_kept:
    input:
        teacher=ssl_teacher_for,
    output:
        model=f"{OUT}/tokenizer/{{variant}}/k{{kept}}/model.pt",
    params:
        outdir=lambda wc: f"{OUT}/tokenizer/{wc.variant}/k{wc.kept}",
        settings=lambda wc: variant_hash(wc.variant),
        launch=launch("gpu_rule"),
        teacher=lambda wc, input: f"--teacher {input.teacher}" if input.teacher else "",
    log:
        f"{OUT}/logs/train_tokenizer/{{variant}}_k{{kept}}.log",
    benchmark:
        f"{OUT}/benchmarks/train_tokenizer/{{variant}}_k{{kept}}.tsv"
    priority: 10
    resources:
        **resumable("gpu_rule"),
    shell:
        resumable_shell("{params.launch} train-tokenizer --config \"$MERGEVQ_CONFIG\" --variant '{wildcards.variant}' "
                        "--kept {wildcards.kept} --out {params.outdir} {params.teacher}")
