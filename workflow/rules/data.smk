# Evaluation inputs shared by every later rule: the demo's FID feature extractor (a small digits
# classifier, trained here because no Inception weights exist offline) and the features of the
# validation originals under the configured extractor, computed once and reused by every rFID.


rule demo_classifier:
    output:
        weights=f"{OUT}/eval/demo_classifier.pt",
        summary=f"{OUT}/eval/demo_classifier.json",
    params:
        settings=config_hash({"eval": config["eval"].get("demo_classifier"), "data": config["data"]}),
    log:
        f"{OUT}/logs/demo_classifier.log",
    benchmark:
        f"{OUT}/benchmarks/demo_classifier.tsv"
    resources:
        **res("cpu_rule"),
    shell:
        "mergevq train-demo-classifier --config \"$MERGEVQ_CONFIG\" --out {output.weights} "
        "--json {output.summary} > {log} 2>&1"


rule reference_features:
    input:
        classifier=CLASSIFIER,
    output:
        features=f"{OUT}/eval/reference/val_features.pt",
    params:
        classifier=lambda wc, input: f"--classifier {input.classifier}" if input.classifier else "",
        # what the features depend on (not batch size or the number of bootstrap resamples)
        settings=config_hash({"extractor": config["eval"]["fid"]["extractor"], "num_images": config["eval"]["fid"]["num_images"],
                              "data": config["data"], "weights": config["weights"].get("inception")}),
    log:
        f"{OUT}/logs/reference_features.log",
    benchmark:
        f"{OUT}/benchmarks/reference_features.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "mergevq reference-features --config \"$MERGEVQ_CONFIG\" {params.classifier} "
        "--out {output.features} > {log} 2>&1"
