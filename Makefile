# Fine-Tuning Studio — the README's two commands are `make up` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
export STUDIO_DATA_DIR ?= $(CURDIR)/.studio

.PHONY: setup up test test-fast lint services browser clean gpu

setup: $(VENV)/.installed

# torch is installed first and pinned exactly: 2.13.0 is the CPU build that CI machines have on disk.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## Run the product on the embedded default (SQLite + local storage) with a tiny demo model.
up: setup
	@test -f $(STUDIO_DATA_DIR)/models/tiny/config.json || $(BIN)/studio models tiny $(STUDIO_DATA_DIR)/models/tiny
	$(BIN)/studio up

## The whole test suite against real Postgres and Redis (started here if they are down), and Chromium for the web UI.
test: setup services browser
	$(BIN)/python -m pytest -q -p no:cacheprovider

## The fast tests (`-m fast`): in-process, on SQLite, no Postgres, Redis or Celery; under a minute.
## (No `setup` prerequisite: a newer pyproject.toml would reinstall first; a missing venv is still made.)
test-fast:
	@test -x $(BIN)/python || $(MAKE) setup
	STUDIO_TEST_SERVICES=0 $(BIN)/python -m pytest -q -p no:cacheprovider -m fast

services:
	@bash .ci/services.sh

browser:
	@bash .ci/browser.sh

lint: setup
	$(BIN)/ruff check app workers tests benchmarks
	$(BIN)/ruff format --check app workers tests benchmarks
	$(BIN)/mypy app workers
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .studio .pytest_cache .mypy_cache .ruff_cache *.egg-info

## On a CUDA machine with only torch/transformers/peft (the lent GPU box): carry .whl/ from
## ../shared/gpu/wheels.sh pytest==9.0.1 pluggy iniconfig PyYAML; results land in $(OUT).
OUT ?= gpu-results
gpu:
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
	mkdir -p $(OUT)
	PYTHONPATH=/tmp/site:. STUDIO_TEST_SERVICES=0 python3 -m pytest -q -m gpu -p no:cacheprovider tests/workers | tee $(OUT)/gpu-tests.txt
	PYTHONPATH=/tmp/site:. python3 benchmarks/inference_engine.py --shape tinyllama --adapters 3 --out $(OUT)/inference_engine.json | tee $(OUT)/inference_engine.txt
	PYTHONPATH=/tmp/site:. python3 benchmarks/training.py --shape tinyllama | tee $(OUT)/training.txt
