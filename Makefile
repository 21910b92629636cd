# rededit — `make help` lists the targets. Every target creates .venv on first use (pip only).
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= outputs/demo
# Never reach a model hub at run time (see OFFLINE.md); tokenizer threads stay off for the 2-core default.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.DEFAULT_GOAL := help
.PHONY: help venv demo test test-slow lint format bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24" "setuptools>=69,<81" wheel
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install rededit with its dev extras

demo: $(STAMP) ## build the synthetic corpus and run the main job on the embedded default
	$(BIN)/rededit-data synth --out $(DEMO_DIR)/corpus --n 600 --seed 0
	$(BIN)/rededit-data validate $(DEMO_DIR)/corpus/manifest.parquet
	$(BIN)/rededit-data buckets --manifest $(DEMO_DIR)/corpus/manifest.parquet --buckets ct --token-budget 4096 --world-size 2 \
		--rank-schedule $(DEMO_DIR)/rank_schedule.jsonl

test: $(STAMP) ## run the default test tier (what CI runs)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) ## run the slow tier too
	$(BIN)/python -m pytest -q -m "not gpu"

lint: $(STAMP) ## ruff lint + format check
	$(BIN)/ruff check src tests data_scripts experiments
	$(BIN)/ruff format --check src tests data_scripts experiments

format: $(STAMP) ## ruff autofix + format
	$(BIN)/ruff check --fix src tests data_scripts experiments
	$(BIN)/ruff format src tests data_scripts experiments

bench: $(STAMP) ## run the benchmarks in experiments/benchmarks and print their figures
	$(BIN)/python experiments/benchmarks/bucket_sampler/run.py

clean: ## remove build and run outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache build src/*.egg-info
