# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CORES ?= 2
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
# One thread per job: snakemake runs $(CORES) jobs side by side, and OpenMP threads spinning on an
# oversubscribed CPU are many times slower than one thread each.
export OMP_NUM_THREADS := 1

.PHONY: demo test venv dryrun clean-demo guard slurm-up slurm-down

venv: $(STAMP)

# torch/torchvision pinned to the builds this project is tested with on CPU machines; a cluster
# uses environment.yml (its own CUDA build) instead.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake all --configfile config/demo.yaml --cores $(CORES)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake all --configfile config/demo.yaml --report results/demo/report.html
	@echo "demo outputs: results/demo/ (open results/demo/report.html in a browser)"

test: $(STAMP)
	$(PY) -m pytest

dryrun: $(STAMP)
	$(VENV)/bin/snakemake all -n --cores 1 --configfile config/demo.yaml
	$(VENV)/bin/snakemake all -n --cores 1 --configfile config/config.yaml

clean-demo:
	rm -rf results/demo

# The quality guard: the demo's key numbers against tests/quality_bounds.yaml (after `make demo`).
guard: $(STAMP)
	$(VENV)/bin/mergevq check-quality --results results/demo

# A single-node SLURM cluster on this machine (Debian, root) for the `slurm`-marked tests: `make
# slurm-up test` runs them against it; `make slurm-down` ends the daemons slurm-up started.
slurm-up:
	tests/slurm/start-local-slurm.sh

slurm-down:
	tests/slurm/start-local-slurm.sh stop
