# racebench: `make run` (install + default sweep + plots), `make test` (install + pytest), `make lint`.
# Everything installs into a project-local virtual environment, .venv/.
# TORCH is the torch requirement installed first; the default is the CPU build of 2.13 (taken from the
# local wheel cache where there is one), so pip never pulls a multi-GB CUDA build onto a CPU machine.
# On a GPU machine: make run TORCH="torch>=2.11"   (or any pip requirement, e.g. a CUDA index URL).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP_FLAGS ?= -q --disable-pip-version-check
BIN := $(VENV)/bin

.PHONY: install run test lint bench-race clean

install:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) "$(TORCH)"
	$(BIN)/python -m pip install $(PIP_FLAGS) -e ".[dev]"

run: install
	$(BIN)/racebench sweep
	$(BIN)/racebench plot

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check racebench tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
