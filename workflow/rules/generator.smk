# Stage 2 (Sec. 4, App. A.2): codes of each frozen tokenizer, a class-conditional generator trained
# on them, samples at every CFG scale of the sweep, gFID/IS (and the demo's class consistency and
# memorisation) of each, then the final sample set at the scale with the lowest sweep gFID
# (Table 3's protocol: sweep on 10 per class, report 50 per class).
#   results/{run}/codes/{variant}/k{K}/{split}.json                  extract_codes
#   results/{run}/generator/{gen}_{variant}/model.pt                  train_generator
#   results/{run}/samples/{gen}_{variant}/cfg{s}/samples.json         sample_sweep
#   results/{run}/samples/{gen}_{variant}/final/samples.json          sample_final
#   results/{run}/samples/{gen}_{variant}/{cfg{s}|final}/metrics.json generation_metrics
# The undeclared shards (codes), last.ckpt (training) and images/ + parts/ (samples) beside the
# declared files survive a failed job, so its retry resumes.
# Generators (mergevq.train.generator): LlamaGen reads codes at K = L; MergeAR trains on codes at
# every K of its stage-2 merge-ratio sampler (one extract_codes job per K) and samples at the
# variant's target K; RandAR trains and samples at the target K and decodes through the variant's
# fine-tuned Source Recovery (finetune_recovery).

from mergevq.train.generator import generator_hash, inference_kept, training_kept

GENERATOR = config.get("generator", {})
SAMPLING = GENERATOR.get("sampling", {})
# (generator, tokenizer variant) pairs the config trains; LlamaGen runs at K = L (`merge_num: 0` in
# the authors' stage-2 configs): Table 3's "(G+R)+LlamaGen-L, 256 steps", Table 5's "(G)+LlamaGen, 1024".
GENERATOR_KINDS = ("llamagen", "mergear", "randar")
GENERATOR_RUNS = [(g, v) for g in GENERATOR_KINDS for v in GENERATOR.get(g, {}).get("variants", []) if v in VARIANTS]


def cfg_scales(gen):
    """The CFG sweep of a generator: generator.<gen>.cfg_scales, else generator.sampling.cfg_scales
    (RandAR ramps the scale from 1, so its useful end values lie higher)."""
    return [f"{s:g}" for s in GENERATOR.get(gen, {}).get("cfg_scales") or SAMPLING.get("cfg_scales", [])]

GENERATION_METRICS = [f"{OUT}/samples/{g}_{v}/final/metrics.json" for g, v in GENERATOR_RUNS]
FINAL_SAMPLES = [f"{OUT}/samples/{g}_{v}/final/samples.json" for g, v in GENERATOR_RUNS]


wildcard_constraints:
    gen="|".join(GENERATOR_KINDS),
    split="train|val",
    cfg=r"\d+(\.\d+)?",
    setting=r"cfg\d+(\.\d+)?|final",


def codes_of(split):
    """Codes a generator job reads: validation (and memorisation) at the K it samples at; training
    at every K it trains on (MergeAR: one manifest per K of its stage-2 sampler)."""
    if split == "train":
        return lambda wc: [f"{OUT}/codes/{wc.variant}/k{k}/train.json" for k in training_kept(config, wc.gen, wc.variant)]
    return sample_codes_of(split)


def sample_codes_of(split):
    """Codes at the K a generator samples at (memorisation compares like with like)."""
    return lambda wc: f"{OUT}/codes/{wc.variant}/k{inference_kept(config, wc.gen, wc.variant)}/{split}.json"


def recovery_of(wc):
    """RandAR's generated merged codes are placed by the variant's Source Recovery fine-tuned for
    generation (generator.recovery_randar) or, without that block, the stage-1 fine-tuned one."""
    if wc.gen != "randar":
        return []
    name = "recovery_randar" if GENERATOR.get("recovery_randar") else "recovery"
    return [f"{OUT}/tokenizer/{wc.variant}/{name}/model.pt"]


def recovery_flag(wc, input):
    return f"--recovery {input.recovery}" if input.recovery else ""


def sample_settings(wc):
    """What a sample folder depends on besides its scale and count (the batch size changes nothing)."""
    extra = {"mergear": {"kept": inference_kept(config, "mergear", wc.variant)},
             "randar": {"decode_steps": GENERATOR.get("randar", {}).get("decode_steps")}}.get(wc.gen)
    return config_hash({**{k: SAMPLING.get(k) for k in ("temperature", "top_k", "top_p", "seed")},
                        **({"generate": extra} if extra else {})})


rule extract_codes:
    input:
        tokenizer=f"{OUT}/tokenizer/{{variant}}/model.pt",
    output:
        manifest=f"{OUT}/codes/{{variant}}/k{{kept}}/{{split}}.json",
    params:
        outdir=lambda wc: f"{OUT}/codes/{wc.variant}/k{wc.kept}",
        settings=config_hash({"data": config["data"], "seed": config["seed"], "codes": GENERATOR.get("codes")}),
        launch=launch("eval_rule"),
    log:
        f"{OUT}/logs/extract_codes/{{variant}}_k{{kept}}_{{split}}.log",
    benchmark:
        f"{OUT}/benchmarks/extract_codes/{{variant}}_k{{kept}}_{{split}}.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "{params.launch} extract-codes --config \"$MERGEVQ_CONFIG\" --tokenizer {input.tokenizer} "
        "--kept {wildcards.kept} --split {wildcards.split} --out {params.outdir} > {log} 2>&1"


rule train_generator:
    input:
        train=codes_of("train"),
        val=codes_of("val"),
    output:
        model=f"{OUT}/generator/{{gen}}_{{variant}}/model.pt",
    params:
        outdir=lambda wc: f"{OUT}/generator/{wc.gen}_{wc.variant}",
        settings=lambda wc: generator_hash(config, wc.gen),
        launch=launch("gpu_rule"),
    log:
        f"{OUT}/logs/train_generator/{{gen}}_{{variant}}.log",
    benchmark:
        f"{OUT}/benchmarks/train_generator/{{gen}}_{{variant}}.tsv"
    priority: 5
    resources:
        **resumable("gpu_rule"),
    shell:
        resumable_shell("{params.launch} train-generator --config \"$MERGEVQ_CONFIG\" --generator {wildcards.gen} "
                        "--variant '{wildcards.variant}' --codes {input.train} --val-codes {input.val} --out {params.outdir}")


rule sample_sweep:
    input:
        generator=f"{OUT}/generator/{{gen}}_{{variant}}/model.pt",
        tokenizer=f"{OUT}/tokenizer/{{variant}}/model.pt",
        recovery=recovery_of,
    output:
        meta=f"{OUT}/samples/{{gen}}_{{variant}}/cfg{{cfg}}/samples.json",
        npz=f"{OUT}/samples/{{gen}}_{{variant}}/cfg{{cfg}}/samples.npz",
        codes=f"{OUT}/samples/{{gen}}_{{variant}}/cfg{{cfg}}/codes.pt",
    params:
        outdir=lambda wc: f"{OUT}/samples/{wc.gen}_{wc.variant}/cfg{wc.cfg}",
        per_class=SAMPLING.get("sweep_per_class"),
        settings=sample_settings,
        recovery=recovery_flag,
        launch=launch("eval_rule"),
    log:
        f"{OUT}/logs/sample/{{gen}}_{{variant}}_cfg{{cfg}}.log",
    benchmark:
        f"{OUT}/benchmarks/sample/{{gen}}_{{variant}}_cfg{{cfg}}.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "{params.launch} sample --config \"$MERGEVQ_CONFIG\" --generator {input.generator} --tokenizer {input.tokenizer} {params.recovery} "
        "--cfg {wildcards.cfg} --num-per-class {params.per_class} --out {params.outdir} > {log} 2>&1"


rule sample_final:
    input:
        sweep=lambda wc: [f"{OUT}/samples/{wc.gen}_{wc.variant}/cfg{s}/metrics.json" for s in cfg_scales(wc.gen)],
        generator=f"{OUT}/generator/{{gen}}_{{variant}}/model.pt",
        tokenizer=f"{OUT}/tokenizer/{{variant}}/model.pt",
        recovery=recovery_of,
    output:
        meta=f"{OUT}/samples/{{gen}}_{{variant}}/final/samples.json",
        npz=f"{OUT}/samples/{{gen}}_{{variant}}/final/samples.npz",
        codes=f"{OUT}/samples/{{gen}}_{{variant}}/final/codes.pt",
    params:
        outdir=lambda wc: f"{OUT}/samples/{wc.gen}_{wc.variant}/final",
        per_class=SAMPLING.get("num_per_class"),
        settings=sample_settings,
        recovery=recovery_flag,
        launch=launch("eval_rule"),
    log:
        f"{OUT}/logs/sample/{{gen}}_{{variant}}_final.log",
    benchmark:
        f"{OUT}/benchmarks/sample/{{gen}}_{{variant}}_final.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "{params.launch} sample --config \"$MERGEVQ_CONFIG\" --generator {input.generator} --tokenizer {input.tokenizer} {params.recovery} "
        "--cfg-from {input.sweep} --num-per-class {params.per_class} --out {params.outdir} > {log} 2>&1"


rule generation_metrics:
    # gFID / IS (paper: against ADM's reference statistics; demo: against the validation images in
    # the demo classifier's features), plus the demo's class consistency and memorisation.
    input:
        samples=f"{OUT}/samples/{{gen}}_{{variant}}/{{setting}}/samples.json",
        classifier=CLASSIFIER,
        train=sample_codes_of("train"),
        val=sample_codes_of("val"),
    output:
        metrics=f"{OUT}/samples/{{gen}}_{{variant}}/{{setting}}/metrics.json",
    params:
        samples=lambda wc, input: str(Path(input.samples).parent),
        classifier=lambda wc, input: f"--classifier {input.classifier}" if input.classifier else "",
        # RandAR's final samples on the demo: S_hat against the baseline's and random images' S
        source_check=lambda wc, input: ("--source-check" if wc.gen == "randar" and wc.setting == "final"
                                        and input.classifier else ""),
        settings=config_hash({"fid": config["eval"]["fid"], "weights": config["weights"],
                              "metrics": GENERATOR.get("metrics")}),
    log:
        f"{OUT}/logs/generation_metrics/{{gen}}_{{variant}}_{{setting}}.log",
    benchmark:
        f"{OUT}/benchmarks/generation_metrics/{{gen}}_{{variant}}_{{setting}}.tsv"
    resources:
        **res("eval_rule"),
    shell:
        "mergevq generation-metrics --config \"$MERGEVQ_CONFIG\" --samples {params.samples} {params.classifier} "
        "--train-codes {input.train} --val-codes {input.val} {params.source_check} --out {output.metrics} > {log} 2>&1"


# Source Recovery fine-tuned with the trained RandAR generator (App. A.2): from the fine-tuned
# recovery, a `mix` share of each batch carries the generator's teacher-forced codes; RandAR's
# samples decode with it (Table 5 "(G+R)+RandAR").
rule finetune_recovery_randar:
    input:
        tokenizer=f"{OUT}/tokenizer/{{variant}}/model.pt",
        init=f"{OUT}/tokenizer/{{variant}}/recovery/model.pt",
        generator=f"{OUT}/generator/randar_{{variant}}/model.pt",
    output:
        model=f"{OUT}/tokenizer/{{variant}}/recovery_randar/model.pt",
    params:
        outdir=lambda wc: f"{OUT}/tokenizer/{wc.variant}/recovery_randar",
        settings=lambda wc: config_hash({"recovery_finetune": GENERATOR.get("recovery_finetune"),
                                         "recovery_randar": GENERATOR.get("recovery_randar"),
                                         "variant": variant_config(config, wc.variant), "data": config["data"],
                                         "seed": config["seed"]}),
        launch=launch("gpu_rule"),
    log:
        f"{OUT}/logs/finetune_recovery_randar/{{variant}}.log",
    benchmark:
        f"{OUT}/benchmarks/finetune_recovery_randar/{{variant}}.tsv"
    priority: 5
    resources:
        **resumable("gpu_rule"),
    shell:
        resumable_shell("{params.launch} finetune-recovery --config \"$MERGEVQ_CONFIG\" --tokenizer {input.tokenizer} "
                        "--generator {input.generator} --init {input.init} --out {params.outdir}")
