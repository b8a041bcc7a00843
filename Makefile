# ldcq — every target that needs Python depends on .venv, so a fresh clone needs nothing else.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATASET ?= pointmaze-umaze
MLFLOW_PORT ?= 5000
export MUJOCO_GL ?= egl

.PHONY: help install test lint format data train mlflow-ui clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

# torch goes first and pinned: resolving it together with lightning pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
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

train: data ## the main job on pointmaze-umaze (ARGS="skill_vae.model.beta=0.1 …" overrides)
	$(BIN)/ldcq pipeline run pipelines/pointmaze-umaze.yaml $(ARGS)

mlflow-ui: $(STAMP) ## browse experiments at http://127.0.0.1:5000 (MLFLOW_PORT=…)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

clean: ## remove caches (keeps .venv, datasets, checkpoints and MLflow runs)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
