# Table 4, Fig. 3, Fig. A1: each variant's tokenizer evaluated at every kept count K of its sweep,
# by changing the merge schedule at inference (one tokenizer per variant, as Fig. 3's caption), with S,
# the stage-1 recovery's S_hat and the fine-tuned recovery's (finetune_recovery).


rule evaluate_tokenizer:
    input:
        tokenizer=f"{OUT}/tokenizer/{{variant}}/model.pt",
        recovery=f"{OUT}/tokenizer/{{variant}}/recovery/model.pt",
        reference=rules.reference_features.output.features,
        classifier=CLASSIFIER,
    output:
        metrics=f"{OUT}/sweep/{{variant}}/k{{kept}}/metrics.json",
    params:
        classifier=lambda wc, input: f"--classifier {input.classifier}" if input.classifier else "",
        settings=config_hash({"fid": config["eval"]["fid"], "weights": config["weights"]}),
    log:
        f"{OUT}/logs/evaluate_tokenizer/{{variant}}_k{{kept}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate_tokenizer/{{variant}}_k{{kept}}.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "mergevq evaluate --config \"$MERGEVQ_CONFIG\" --tokenizer {input.tokenizer} --kept {wildcards.kept} "
        "--recovery {input.recovery} --reference {input.reference} {params.classifier} --out {output.metrics} > {log} 2>&1"


# Table 4's per-K protocol: each tokenizer trained for K (train_tokenizer_at_kept), scored at that K.
rule evaluate_tokenizer_at_kept:
    input:
        tokenizer=f"{OUT}/tokenizer/{{variant}}/k{{kept}}/model.pt",
        reference=rules.reference_features.output.features,
        classifier=CLASSIFIER,
    output:
        metrics=f"{OUT}/per_kept/{{variant}}/k{{kept}}/metrics.json",
    params:
        classifier=lambda wc, input: f"--classifier {input.classifier}" if input.classifier else "",
        settings=config_hash({"fid": config["eval"]["fid"], "weights": config["weights"]}),
    log:
        f"{OUT}/logs/evaluate_tokenizer/{{variant}}_trained_k{{kept}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate_tokenizer/{{variant}}_trained_k{{kept}}.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "mergevq evaluate --config \"$MERGEVQ_CONFIG\" --tokenizer {input.tokenizer} --kept {wildcards.kept} "
        "--reference {input.reference} {params.classifier} --out {output.metrics} > {log} 2>&1"
