# rededit — `make help` lists the targets. Every target creates .venv on first use (pip only).
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The default test tier exercises the real face, OCR, data-engine, SLURM-launcher and DeepSpeed parts (all
# offline wheels), the Optuna sweeper and TensorBoard; only Ray and wandb stay optional.
EXTRAS ?= dev,face,ocr,engine,slurm,deepspeed,optuna,tensorboard,memory
DEMO_DIR ?= outputs/demo
DEMO_N ?= 6000
# Bench items per task of the demo report and of rededit-eval: the same items, so their numbers agree.
DEMO_PER_TASK ?= 16
# The demo's simpler world (experiments/demo/README.md): 64×64 pictures, at most 2 large shapes, solid or gradient
# backgrounds, signs only in the text task, English texts (the embedded MiniLM encoder is English-only).
DEMO_WORLD ?= --min-side 64 --max-side 64 --max-objects 2 --backgrounds solid,gradient --object-size 0.3,0.45 \
	--sign-prob 0 --zh-prob 0
DEMO_DATA = data.manifest=$(DEMO_DIR)/corpus/manifest.parquet data.text_cache=$(DEMO_DIR)/text_cache
# `make demo-lora` (issue 20, experiments/demo_lora/README.md): a LoRA teaches the demo editor a task it never saw
# (invert: one object's colours negated). Half of its corpus is that task, half the demo's own mix at half weight
# (it keeps the LoRA from unlearning the other tasks); the bench split scores base and LoRA on the same items.
DEMO_LORA_DIR ?= outputs/demo_lora
DEMO_LORA_N ?= 3000
DEMO_LORA_MIX ?= invert=0.5,t2i=0.07,add=0.05,remove=0.05,replace=0.04,color=0.05,background=0.04,stylize=0.045,restore=0.035,text=0.04,viewpoint=0.035,compose=0.045
# A held-out inversion (bench-000002 of that corpus: the corpus is deterministic) for the --lora == merged check.
DEMO_LORA_PROBE ?= $(DEMO_LORA_DIR)/corpus/images/bench/0000/000002_ref0.png
DEMO_LORA_PROBE_TEXT ?= Apply a colour inversion to the orange diamond located in the centre only.
# Never reach a model hub at run time (see docs/architecture.md "Offline parts"); tokenizer threads stay off for the 2-core default.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.DEFAULT_GOAL := help
.PHONY: help venv demo demo-lora test test-slow lint format bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24" "setuptools>=69,<81" wheel
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install rededit with its dev extras

demo: $(STAMP) ## build the synthetic corpus, train the tiny editor (one stage) and write outputs/demo/report.md
	$(BIN)/rededit-data synth --out $(DEMO_DIR)/corpus --n $(DEMO_N) --seed 0 $(DEMO_WORLD) --overwrite
	$(BIN)/rededit-data validate $(DEMO_DIR)/corpus/manifest.parquet
	$(BIN)/rededit-data buckets --manifest $(DEMO_DIR)/corpus/manifest.parquet --buckets tiny --token-budget 1024 \
		--world-size 2 --rank-schedule $(DEMO_DIR)/rank_schedule.jsonl --top 12
	$(BIN)/rededit-data encode-text --manifest $(DEMO_DIR)/corpus/manifest.parquet --cache $(DEMO_DIR)/text_cache
	rm -rf $(DEMO_DIR)/checkpoints  # a fresh run: rededit-train refuses to mix with an earlier run's checkpoints
	$(BIN)/rededit-train experiment=demo $(DEMO_DATA) hydra.run.dir=$(DEMO_DIR)
	$(BIN)/python -m rededit.eval.demo_report --checkpoint $(DEMO_DIR)/export --manifest $(DEMO_DIR)/corpus/manifest.parquet \
		--out $(DEMO_DIR) --max-per-task $(DEMO_PER_TASK) --runs demo=$(DEMO_DIR)
	$(BIN)/rededit-eval checkpoint=$(DEMO_DIR)/export benchmark.manifest_path=$(DEMO_DIR)/corpus/manifest.parquet \
		benchmark.max_per_task=$(DEMO_PER_TASK) out_dir=$(DEMO_DIR)/eval
	@echo "demo: see $(DEMO_DIR)/report.md, $(DEMO_DIR)/grid.png, $(DEMO_DIR)/loss_curves.png, $(DEMO_DIR)/eval/table.md"

demo-lora: $(STAMP) ## after `make demo`: a LoRA learns colour inversion on the demo editor; base vs LoRA table
	@test -f $(DEMO_DIR)/export/rededit.yaml || { echo "demo-lora: no $(DEMO_DIR)/export: run make demo first"; exit 1; }
	$(BIN)/rededit-data synth --out $(DEMO_LORA_DIR)/corpus --n $(DEMO_LORA_N) --bench-n 600 --seed 0 $(DEMO_WORLD) \
		--task-weights $(DEMO_LORA_MIX) --overwrite
	$(BIN)/rededit-data validate $(DEMO_LORA_DIR)/corpus/manifest.parquet
	$(BIN)/rededit-data encode-text --manifest $(DEMO_LORA_DIR)/corpus/manifest.parquet --cache $(DEMO_LORA_DIR)/text_cache
	rm -rf $(DEMO_LORA_DIR)/checkpoints
	$(BIN)/rededit-train experiment=demo_lora stage.init_from=$(DEMO_DIR)/export \
		data.manifest=$(DEMO_LORA_DIR)/corpus/manifest.parquet data.text_cache=$(DEMO_LORA_DIR)/text_cache \
		hydra.run.dir=$(DEMO_LORA_DIR)
	$(BIN)/python -m rededit.eval.demo_report --checkpoint $(DEMO_DIR)/export \
		--manifest $(DEMO_LORA_DIR)/corpus/manifest.parquet --out $(DEMO_LORA_DIR)/base_report --max-per-task $(DEMO_PER_TASK)
	$(BIN)/python -m rededit.eval.demo_report --checkpoint $(DEMO_LORA_DIR)/export \
		--manifest $(DEMO_LORA_DIR)/corpus/manifest.parquet --out $(DEMO_LORA_DIR)/lora_report \
		--max-per-task $(DEMO_PER_TASK) --runs demo_lora=$(DEMO_LORA_DIR)
	$(BIN)/python experiments/demo_lora/compare.py --base $(DEMO_LORA_DIR)/base_report/metrics.json \
		--lora $(DEMO_LORA_DIR)/lora_report/metrics.json --task invert --out $(DEMO_LORA_DIR)
	@# the exported LoRA file on the base == the merged editor (one held-out picture, 8-bit outputs)
	$(BIN)/rededit-consolidate $(DEMO_LORA_DIR) --merge-adapter --out $(DEMO_LORA_DIR)/merged
	$(BIN)/rededit-edit --checkpoint $(DEMO_DIR)/export --image $(DEMO_LORA_PROBE) --instruction "$(DEMO_LORA_PROBE_TEXT)" \
		--lora $(DEMO_LORA_DIR)/export/adapter/pytorch_lora_weights.safetensors --out $(DEMO_LORA_DIR)/probe_lora.png
	$(BIN)/rededit-edit --checkpoint $(DEMO_LORA_DIR)/merged --image $(DEMO_LORA_PROBE) --instruction "$(DEMO_LORA_PROBE_TEXT)" \
		--out $(DEMO_LORA_DIR)/probe_merged.png
	$(BIN)/python -c "import sys, numpy as np; from PIL import Image; \
		a, b = (np.asarray(Image.open(p), dtype=int) for p in sys.argv[1:]); d = int(np.abs(a - b).max()); \
		print(f'--lora vs merged: max pixel difference {d}'); sys.exit(d > 1)" \
		$(DEMO_LORA_DIR)/probe_lora.png $(DEMO_LORA_DIR)/probe_merged.png
	@echo "demo-lora: see $(DEMO_LORA_DIR)/comparison.md, $(DEMO_LORA_DIR)/lora_report/report.md, $(DEMO_LORA_DIR)/export/adapter/"

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
	$(BIN)/python experiments/benchmarks/train_step/run.py

clean: ## remove build and run outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache build src/*.egg-info
