# MergeVQ reproduction: the whole pipeline as one DAG.
#   cluster:  snakemake --profile slurm all      (config/config.yaml, the paper; after `mergevq cluster-setup`)
#   laptop:   snakemake all --configfile config/demo.yaml --cores 2  (what `make demo` runs)
# Rules call the `mergevq` command line; all logic lives in the package.
import os
from pathlib import Path

from snakemake.utils import min_version, validate

from mergevq.config import (config_hash, resolve_snakemake_config, resolved_config_path, uses_ssl_teacher, variant_config,
                            write_resolved_config)

min_version("9.0")

# `snakemake --report report.html` (make demo writes results/demo/report.html): every table and
# figure, each with its caption from workflow/report/.
report: "workflow/report/workflow.rst"

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


def resumable(kind):
    """Resources of a resumable training rule: its class's, plus, on SLURM, SIGTERM ahead of the time
    limit (a third of the runtime, at most 5 min; SLURM may send it up to a minute early) so the job
    checkpoints and requeues itself (mergevq.train.signals), and an appended SLURM log that keeps
    every attempt. Only training handles the signal: other rules would just die earlier."""
    r = res(kind)
    warn_s = min(300, r["runtime"] * 20)
    return {**r, "slurm_extra": f"--signal=TERM@{warn_s} --open-mode=append"}


def launch(kind):
    """`mergevq`, or torchrun with one process per GPU when the rule class asks for several."""
    gpus = res(kind)["gpu"]
    return f"torchrun --standalone --nproc_per_node={gpus} -m mergevq" if gpus > 1 else "mergevq"


def resumable_shell(command):
    """The shell line of a resumable training rule (params: `outdir`; output: `model`).

    Every attempt appends to {outdir}/train.log (beside last.ckpt, undeclared: Snakemake deletes a
    rule's declared log when a job starts), after an `== attempt` header, and copies it to the
    declared {log} when it exits, so the line of a preempted attempt ("preempted at step N ...
    requeued") survives the attempt that resumes and finishes the training. `trap : TERM` keeps
    this shell alive on SLURM's SIGTERM until the trainer has written its checkpoint and exited (a
    dead shell would end the job step and kill the trainer mid-write). A trainer killed by a late
    SIGTERM after it wrote model.pt (atomically, and only when training is complete; Snakemake
    removed any older one before the job) has succeeded: `|| test -f` says so."""
    train_log = "{params.outdir}/train.log"
    return (f'trap : TERM; trap "cp {train_log} {{log}}" EXIT; mkdir -p {{params.outdir}}; '
            f'echo "== attempt $(date -Is) on $(hostname), SLURM job ${{{{SLURM_JOB_ID:-none}}}}" >> {train_log}; '
            f'{command} >> {train_log} 2>&1 || test -f {{output.model}}')


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


# Tables and figures run on the submitting node under `--profile slurm` (seconds each; a queued job
# would wait longer than it runs).
localrules:
    all,
    table,
    figure_tradeoff,
    figure_merge_sampling,
    figure_merge_maps,
    figure_reconstructions,
    figure_samples,


include: "workflow/rules/data.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/generator.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        expand(f"{OUT}/tables/{{table}}.{{ext}}", table=["table1", "table2", "table3", "table4", "table5"], ext=["csv", "md"]),
        expand(
            f"{OUT}/figures/{{fig}}.png",
            fig=["fig3_tradeoff", "fig4_merge_maps", "fig5_merge_sampling", "figA1_reconstructions"]
            + (["figA2_samples"] if GENERATOR_RUNS else []),
        ),
