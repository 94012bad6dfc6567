# The two commands of the README: `make demo` and `make test`. Both start with `make setup`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On a machine where pip has no local CPU torch wheel, pass PyTorch's CPU index:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
export TORCH_INDEX PYTHON

.PHONY: setup demo demo-build test test-fast lint clean

setup:
	@bash scripts/setup.sh

demo-build: setup
	$(VENV)/bin/switchyard demo build

demo: setup
	@bash scripts/demo.sh

test: setup
	$(VENV)/bin/switchyard demo build
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not engine" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-quant artifacts
