# Two commands on a fresh machine: `make demo` (set up, then generate an image with the tiny model on the CPU)
# and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch: enough for the tiny model, tests and CI. On a GPU machine install the CUDA build
# that matches your driver first (pip install torch), then `make setup TORCH=`.
TORCH ?= torch==2.13.0
# Triton beside the CPU torch: tests compile our GPU kernels for an H100 with it (no GPU needed). torch's CUDA
# builds bring their own; 3.6.0 is what the device machine's torch 2.11 ships.
TRITON ?= triton==3.6.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint check clean

$(BIN)/imagesmith: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH),$(BIN)/pip install --quiet "$(TORCH)" "$(TRITON)")
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

setup: $(BIN)/imagesmith

demo: setup
	IMAGESMITH_MODEL=tiny $(BIN)/imagesmith generate "a lighthouse on a cliff at dawn, featured image" \
		--seed 42 -o demo.png
	@echo "demo.png written: the tiny model has random weights, so expect coloured noise (see README)."

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/mypy benchmarks/*.py

check: lint test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo*.png
