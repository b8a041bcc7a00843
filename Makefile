# ldcq — every target that needs Python depends on .venv, so a fresh clone needs nothing else.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATASET ?= pointmaze-umaze
ANTMAZE ?= large-diverse
KITCHEN ?= mixed
SEEDS ?= 3
GRID ?=
PIPELINE ?= pointmaze-umaze
# SCALE=paper (reference sizes, for a GPU) or cpu (within ~2 h on a 2-core CPU); by default the
# one that fits this machine.
SCALE ?=
scale = $${SCALE:-$$($(BIN)/python -c 'import torch; print("paper" if torch.cuda.is_available() else "cpu")')}
MLFLOW_PORT ?= 5000
MLFLOW_HOST ?= 127.0.0.1
export MUJOCO_GL ?= egl

.PHONY: help install test lint format data train train-maze2d-umaze train-maze2d-medium \
	train-maze2d-large train-antmaze train-kitchen eval mlflow-ui clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}'

# torch goes first and pinned: resolving it together with lightning pulls a multi-GB CUDA build.
# constraints.txt holds the exact versions tested here; pyproject.toml only ranges.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create/update .venv (re-runs only when pyproject.toml changes)

test: $(STAMP) ## run the test suite
	$(BIN)/pytest -q

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

data: $(STAMP) ## generate the default dataset (DATASET=pointmaze-umaze; skips one that exists)
	$(BIN)/ldcq data show $(DATASET) 2>/dev/null || $(BIN)/ldcq data generate $(DATASET)

train: data ## the main job: pointmaze-umaze, quick scale, evaluated (ARGS="seed=1 …" overrides)
	$(BIN)/ldcq pipeline run pipelines/pointmaze-umaze.yaml $(ARGS)

eval: $(STAMP) ## evaluate the trained pointmaze-umaze stages again (ARGS="evaluation.selector=prior")
	$(BIN)/ldcq eval pipelines/pointmaze-umaze.yaml $(ARGS)

train-maze2d-umaze: $(STAMP) ## maze2d-umaze at SCALE=cpu|paper (dataset generated here)
	$(MAKE) data DATASET=pointmaze-umaze
	$(BIN)/ldcq pipeline run pipelines/pointmaze-umaze.yaml --scale $(scale) $(ARGS)

train-maze2d-medium: $(STAMP) ## maze2d-medium at SCALE=cpu|paper (dataset generated here)
	$(MAKE) data DATASET=pointmaze-medium
	$(BIN)/ldcq pipeline run pipelines/pointmaze-medium.yaml --scale $(scale) $(ARGS)

train-maze2d-large: $(STAMP) ## maze2d-large at SCALE=cpu|paper (dataset generated here)
	$(MAKE) data DATASET=pointmaze-large
	$(BIN)/ldcq pipeline run pipelines/pointmaze-large.yaml --scale $(scale) $(ARGS)

train-antmaze: $(STAMP) ## D4RL/antmaze/<ANTMAZE>-v1 via Minari (ANTMAZE=large-diverse|medium-diverse|…)
	$(BIN)/ldcq pipeline run pipelines/antmaze-large-diverse.yaml --scale $(scale) \
		dataset=D4RL/antmaze/$(ANTMAZE)-v1 name=antmaze-$(ANTMAZE) $(ARGS)

train-kitchen: $(STAMP) ## D4RL/kitchen/<KITCHEN>-v2 via Minari (KITCHEN=mixed|partial|complete)
	$(BIN)/ldcq pipeline run pipelines/kitchen-mixed.yaml --scale $(scale) \
		dataset=D4RL/kitchen/$(KITCHEN)-v2 name=kitchen-$(KITCHEN) $(ARGS)

.PHONY: bench bench-score sweep results

bench: $(STAMP) ## stage speed, latency, memory, FLOP/s → bench/results/ (ARGS="--device cuda --precision bf16-mixed")
	$(BIN)/python -m ldcq.bench.perf --scale $(or $(SCALE),paper) $(ARGS)

bench-score: $(STAMP) ## LDCQ, prior and BC over SEEDS=3 of PIPELINE=pointmaze-umaze, SCALE=quick|cpu|paper → results/
	$(BIN)/python -m ldcq.bench.score --pipeline pipelines/$(PIPELINE).yaml --seeds $(SEEDS) \
		--scale $(or $(SCALE),quick) $(ARGS)

sweep: $(STAMP) ## GRID="horizon=10,20,30 …" over SEEDS=3 of PIPELINE, SCALE=quick|cpu|paper → results/sweeps/
	@test -n "$(GRID)" || { echo 'make sweep: set GRID, e.g. GRID="horizon=10,20,30"'; exit 2; }
	$(BIN)/ldcq sweep pipelines/$(PIPELINE).yaml $(foreach g,$(GRID),--grid $(g)) --seeds $(SEEDS) \
		--scale $(or $(SCALE),quick) $(ARGS)

results: $(STAMP) ## regenerate the README's results table from results/*.json
	$(BIN)/python -m ldcq.bench.results

mlflow-ui: $(STAMP) ## browse experiments at http://127.0.0.1:5000 (MLFLOW_PORT=…, MLFLOW_HOST=…)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

clean: ## remove caches (keeps .venv, datasets, checkpoints and MLflow runs)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
