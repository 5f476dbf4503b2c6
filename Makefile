# Developer interface: CI runs the same targets (`make test`).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
REQUIREMENTS := requirements/base.txt requirements/train.txt requirements/dev.txt setup.cfg setup.py

export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-fast lint format bench bench-small dist clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(STAMP) ## Create .venv with the pinned stack (Spark, Petastorm, TF, Horovod)

$(STAMP): $(REQUIREMENTS) infra/build_horovod.sh
	@infra/check_java.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/base.txt -r requirements/train.txt \
		-r requirements/dev.txt
	# tf_keras asks for the GPU `tensorflow` package; tensorflow-cpu provides the same module.
	$(PY) -m pip install -q --no-deps -r requirements/train-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	infra/build_horovod.sh $(VENV)
	touch $@

demo: setup ## Run the pipeline on the real 100-row sample and print what each stage did
	$(PY) -m mlimages.demo

test: setup ## Run the test suite (all of it, slow tests included)
	$(PY) -m pytest

test-fast: setup ## Run the tests not marked slow
	$(PY) -m pytest -m "not slow"

lint: setup ## Check style (ruff); changes nothing
	$(VENV)/bin/ruff check mlimages jobs tests bench

format: setup ## Rewrite imports and fixable style issues in place
	$(VENV)/bin/ruff check --fix mlimages jobs tests bench

bench: setup ## Benchmarks at full size (long: see README)
	$(PY) bench/labels.py --rows 17609752
	$(PY) bench/download.py
	$(PY) bench/dataset.py
	$(PY) bench/train.py

bench-small: setup ## Benchmarks at small sizes (labels at 1M rows)
	$(PY) bench/labels.py --rows 1000000
	$(PY) bench/download.py --small
	$(PY) bench/dataset.py --small
	$(PY) bench/train.py --small

dist: setup ## Build the wheel and the --py-files zip a cluster run needs, into dist/
	$(PY) -m pip wheel -q --no-deps -w dist .
	cd jobs && zip -q -r ../dist/mlimages_jobs.zip . -x '__pycache__/*'
	zip -q -r dist/mlimages.zip mlimages -x '*/__pycache__/*'

clean: ## Remove build outputs and local runs (keeps .venv)
	rm -rf build dist runs bench/out *.egg-info
