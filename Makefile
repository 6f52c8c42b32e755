# racebench: `make run` (install + default sweep + plots), `make test` (install + pytest; `make test-fast` leaves
# out the slow tests), `make lint`.
# Everything installs into a project-local virtual environment, .venv/.
# TORCH is the torch requirement installed first; the default is the CPU build of 2.13 (taken from the
# local wheel cache where there is one), so pip never pulls a multi-GB CUDA build onto a CPU machine.
# On a GPU machine: make run TORCH="torch>=2.11"   (or any pip requirement, e.g. a CUDA index URL).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP_FLAGS ?= -q --disable-pip-version-check
BIN := $(VENV)/bin

.PHONY: install run test test-fast lint bench-race bench-race-alloc bench-race-2e20 bench-decode gpu-check clean

install:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) "$(TORCH)"
	$(BIN)/python -m pip install $(PIP_FLAGS) -e ".[dev]"

run: install
	$(BIN)/racebench sweep
	$(BIN)/racebench plot

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check racebench tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# Issue-5 measurements side by side (B=1, H=4, D=128, P=L=3, fp32); tens of minutes on a 2-core CPU.
BENCH := $(BIN)/racebench sweep --warmup 1 --repeats 3 --race-P 3 --race-L 3
STAMP := $(shell date +%Y%m%d-%H%M%S)
bench-race: install
	$(BENCH) --methods race,race-paper,linear,performer --min-len 2^14 --max-len 2^20 --time-budget 3m \
		--memory-budget 85% --out results/bench-race-noncausal-$(STAMP)
	$(BENCH) --methods race,race-paper --causal --min-len 2^14 --max-len 2^20 --time-budget 3m \
		--memory-budget 8GiB --refine 0.05 --out results/bench-race-causal-$(STAMP)
	$(BENCH) --methods race --min-len 2^16 --max-len 2^20 --time-budget 5m --memory-budget 4GiB --refine 0.02 \
		--out results/bench-race-threshold-$(STAMP)

# race against race-paper with glibc (the engine's default) and with a jemalloc that reuses freed memory
# (apt-get install libjemalloc2): how much of the difference is fresh memory (docs/cpu-kernels.md).
JEMALLOC ?= /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
JEMALLOC_CONF := MALLOC_CONF=oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1
ALLOC_BENCH := $(BIN)/racebench sweep --methods race,race-paper --lengths 2^18,2^19 --warmup 2 --repeats 3 \
	--race-P 3 --race-L 3 --time-budget 3m
bench-race-alloc: install
	@test -f $(JEMALLOC) || { echo "no jemalloc at $(JEMALLOC): apt-get install libjemalloc2, or JEMALLOC=path"; exit 2; }
	$(ALLOC_BENCH) --out results/bench-race-glibc-$(STAMP)
	LD_PRELOAD=$(JEMALLOC) $(JEMALLOC_CONF) $(ALLOC_BENCH) --out results/bench-race-jemalloc-$(STAMP)

# Target 2 at 2^20 (95% of RAM, so that race-paper fits), under both allocators; about 7 minutes.
BENCH_2E20 := $(BENCH) --methods race,race-paper --lengths 2^20 --memory-budget 95% --time-budget 8m
bench-race-2e20: install
	@test -f $(JEMALLOC) || { echo "no jemalloc at $(JEMALLOC): apt-get install libjemalloc2, or JEMALLOC=path"; exit 2; }
	$(BENCH_2E20) --out results/bench-race-2e20-glibc-$(STAMP)
	LD_PRELOAD=$(JEMALLOC) $(JEMALLOC_CONF) $(BENCH_2E20) --out results/bench-race-2e20-jemalloc-$(STAMP)

# Inference on the CPU (docs/inference.md): prefill, then 64 tokens decoded one at a time, race, flash and linear;
# then race's step after 2^12 and 2^20 tokens side by side.
bench-decode: install
	$(BIN)/racebench sweep --mode decode --methods race,flash,linear --lengths 2^12,2^14,2^16,2^18,2^20 \
		--warmup 1 --time-budget 4m --out results/decode-cpu-$(STAMP)
	$(BIN)/racebench plot results/decode-cpu-$(STAMP) --out plots/decode-cpu-$(STAMP)
	$(BIN)/python benchmarks/decode_flat.py

# Every GPU check and timing within a 470 s deadline, with the machine's own python (nothing installed): ceilings,
# smoke, tuning, paper-protocol and causal sweeps, plots, reports, targets, then the native GPU tests (333 s in all
# on an H200); all under $(OUT).
OUT ?= results/gpu-check
gpu-check:
	OUT=$(OUT) scripts/gpu-check.sh
