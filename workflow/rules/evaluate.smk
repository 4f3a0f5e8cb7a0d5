# Representation learning (Table 1, Fig. 3, App. A.4): linear probing of the frozen EMA encoder at
# every kept count of the sweep, two reference rows run the same way (a randomly initialised
# encoder of each variant, raw pixels), and end-to-end fine-tuning at each variant's target K.


wildcard_constraints:
    kept=r"\d+",
    features="tokens_mean|quantized_mean|global",


rule linear_probe:
    input:
        tokenizer=f"{OUT}/tokenizer/{{variant}}/model.pt",
    output:
        metrics=f"{OUT}/probe/{{variant}}/k{{kept}}/metrics.json",
    params:
        settings=config_hash(config["eval"]["linear_probe"]),
    log:
        f"{OUT}/logs/linear_probe/{{variant}}_k{{kept}}.log",
    benchmark:
        f"{OUT}/benchmarks/linear_probe/{{variant}}_k{{kept}}.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "mergevq linear-probe --config \"$MERGEVQ_CONFIG\" --tokenizer {input.tokenizer} "
        "--kept {wildcards.kept} --out {output.metrics} > {log} 2>&1"


rule linear_probe_features:
    # another feature kind than the config's primary one (eval.linear_probe.extra_features)
    input:
        tokenizer=f"{OUT}/tokenizer/{{variant}}/model.pt",
    output:
        metrics=f"{OUT}/probe/{{variant}}/k{{kept}}/{{features}}/metrics.json",
    params:
        settings=config_hash(config["eval"]["linear_probe"]),
    log:
        f"{OUT}/logs/linear_probe/{{variant}}_k{{kept}}_{{features}}.log",
    benchmark:
        f"{OUT}/benchmarks/linear_probe/{{variant}}_k{{kept}}_{{features}}.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "mergevq linear-probe --config \"$MERGEVQ_CONFIG\" --tokenizer {input.tokenizer} --kept {wildcards.kept} "
        "--set eval.linear_probe.features={wildcards.features} --out {output.metrics} > {log} 2>&1"


rule linear_probe_random_init_features:
    output:
        metrics=f"{OUT}/probe/baselines/random_{{variant}}/{{features}}/metrics.json",
    params:
        settings=lambda wc: config_hash({"probe": config["eval"]["linear_probe"], "variant": variant_config(config, wc.variant)}),
    log:
        f"{OUT}/logs/linear_probe/random_{{variant}}_{{features}}.log",
    benchmark:
        f"{OUT}/benchmarks/linear_probe/random_{{variant}}_{{features}}.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "mergevq linear-probe --config \"$MERGEVQ_CONFIG\" --random-init '{wildcards.variant}' "
        "--set eval.linear_probe.features={wildcards.features} --out {output.metrics} > {log} 2>&1"


rule linear_probe_random_init:
    output:
        metrics=f"{OUT}/probe/baselines/random_{{variant}}/metrics.json",
    params:
        settings=lambda wc: config_hash({"probe": config["eval"]["linear_probe"], "variant": variant_config(config, wc.variant)}),
    log:
        f"{OUT}/logs/linear_probe/random_{{variant}}.log",
    benchmark:
        f"{OUT}/benchmarks/linear_probe/random_{{variant}}.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "mergevq linear-probe --config \"$MERGEVQ_CONFIG\" --random-init '{wildcards.variant}' "
        "--out {output.metrics} > {log} 2>&1"


rule linear_probe_raw_pixels:
    output:
        metrics=f"{OUT}/probe/baselines/raw_pixels/metrics.json",
    params:
        settings=config_hash({"probe": config["eval"]["linear_probe"], "data": config["data"]}),
    log:
        f"{OUT}/logs/linear_probe/raw_pixels.log",
    benchmark:
        f"{OUT}/benchmarks/linear_probe/raw_pixels.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "mergevq linear-probe --config \"$MERGEVQ_CONFIG\" --raw-pixels --out {output.metrics} > {log} 2>&1"


rule finetune:
    input:
        tokenizer=f"{OUT}/tokenizer/{{variant}}/model.pt",
    output:
        metrics=f"{OUT}/finetune/{{variant}}/metrics.json",
    params:
        settings=config_hash(config["eval"]["finetune"]),
    log:
        f"{OUT}/logs/finetune/{{variant}}.log",
    benchmark:
        f"{OUT}/benchmarks/finetune/{{variant}}.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "mergevq finetune --config \"$MERGEVQ_CONFIG\" --tokenizer {input.tokenizer} "
        "--out {output.metrics} > {log} 2>&1"


rule linear_probe_at_kept:
    # Table 4's per-K protocol: the tokenizer trained for K, probed at K
    input:
        tokenizer=f"{OUT}/tokenizer/{{variant}}/k{{kept}}/model.pt",
    output:
        metrics=f"{OUT}/per_kept/{{variant}}/k{{kept}}/probe.json",
    params:
        settings=config_hash(config["eval"]["linear_probe"]),
    log:
        f"{OUT}/logs/linear_probe/{{variant}}_trained_k{{kept}}.log",
    benchmark:
        f"{OUT}/benchmarks/linear_probe/{{variant}}_trained_k{{kept}}.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "mergevq linear-probe --config \"$MERGEVQ_CONFIG\" --tokenizer {input.tokenizer} "
        "--kept {wildcards.kept} --out {output.metrics} > {log} 2>&1"
