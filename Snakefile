# MergeVQ reproduction: the whole pipeline as one DAG.
#   cluster:  snakemake --profile profiles/slurm all                 (config/config.yaml, the paper)
#   laptop:   snakemake all --configfile config/demo.yaml --cores 2  (what `make demo` runs)
# Rules call the `mergevq` command line; all logic lives in the package.
import os
from pathlib import Path

from snakemake.utils import min_version, validate

from mergevq.config import (config_hash, resolve_snakemake_config, resolved_config_path, uses_ssl_teacher, variant_config,
                            write_resolved_config)

min_version("9.0")

# No `configfile:` directive on purpose: Snakemake would deep-merge --configfile over it (see
# mergevq.config.resolve_snakemake_config). The resolved config replaces `config` wholesale.
CONFIG_PATH, _resolved = resolve_snakemake_config(
    workflow.overwrite_configfiles, workflow.config_settings.config, "config/config.yaml"
)
validate(_resolved, "workflow/schemas/config.schema.yaml")
config.clear()
config.update(_resolved)

RUN = config["run"]
wildcard_constraints:
    variant="|".join(v.replace("+", r"\+") for v in config["tokenizer"]["variants"]),

OUT = f"results/{RUN}"
VARIANTS = list(config["tokenizer"]["variants"])

# The resolved config every job reads: content-addressed (results/{run}/configs/{hash}.yaml), written
# in `onstart` (a dry run writes nothing) and handed to jobs through the MERGEVQ_CONFIG environment
# variable (rules call `mergevq ... --config "$MERGEVQ_CONFIG"`). Not a rule param: a param holding the
# hash would rerun every job on any config change. Each rule's `settings` param hashes only the config
# parts it uses, so a change reruns exactly the jobs whose own settings changed. SLURM jobs re-parse
# this file and set the same variable.
CONFIG_FILE = resolved_config_path(config, OUT)
os.environ["MERGEVQ_CONFIG"] = str(CONFIG_FILE)


onstart:
    write_resolved_config(dict(config), CONFIG_FILE)


def res(kind):
    """Resources of a rule class from the config (gpu, mem_mb, runtime, cpus_per_task)."""
    return config["resources"][kind]


def launch(kind):
    """`mergevq`, or torchrun with one process per GPU when the rule class asks for several."""
    gpus = res(kind)["gpu"]
    return f"torchrun --standalone --nproc_per_node={gpus} -m mergevq" if gpus > 1 else "mergevq"


def variant_hash(variant):
    """Params trigger: a tokenizer job reruns when its own variant's settings change, not others'."""
    return config_hash({"variant": variant_config(config, variant), "data": config["data"], "seed": config["seed"]})


# The demo scores FID with its own digits classifier (its own rule); the paper config uses
# torch-fidelity's Inception-v3 from weights.inception.
CLASSIFIER = f"{OUT}/eval/demo_classifier.pt" if config["eval"]["fid"]["extractor"] == "demo-classifier" else []
# The offline alignment teacher (`tokenizer.loss.teacher: ssl`): SimCLR, trained before the
# tokenizers in its own rule, as DINOv2 was before the paper's; the paper config reads DINOv2.
SSL_TEACHER = f"{OUT}/ssl_teacher/model.pt"


def ssl_teacher_for(wc):
    return SSL_TEACHER if uses_ssl_teacher(config, wc.variant) else []


include: "workflow/rules/data.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        expand(f"{OUT}/tables/{{table}}.{{ext}}", table=["table1", "table2", "table4", "table5"], ext=["csv", "md"]),
        expand(
            f"{OUT}/figures/{{fig}}.png",
            fig=["fig3_tradeoff", "fig4_merge_maps", "fig5_merge_sampling", "figA1_reconstructions"],
        ),
