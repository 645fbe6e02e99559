# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, generate jets, train, export, run inference
#   make test   create .venv, install, run the test suite (not slow; GPU tests only with CUDA)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test test-all test-slow lint format clean-runs help system-packages

help:
	@echo "make demo | make test | make test-all | make lint | make format"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,pythia]"
	@touch $(STAMP)

# The whole path on the default data: generate and train, export with parity, benchmark the
# standalone inference runtime, then score held-out jets (another Pythia seed) with the predict
# job (data/heldout-scores/heldout_scores.parquet).
demo: $(STAMP)
	$(BIN)/python scripts/train.py experiment=mlp
	$(BIN)/python scripts/export.py name=mlp overwrite=true
	$(BIN)/python scripts/generate.py data.source.seed=7 data.source.n_jets=2000 output=data/heldout.parquet
	$(BIN)/python scripts/benchmark.py inference exported/mlp
	$(BIN)/python scripts/predict.py export=exported/mlp files=data/heldout.parquet out=data/heldout-scores overwrite=true

# System packages the tests use beside the Python ones, installed with apt-get when missing:
# OpenBLAS, which the C++ that SOFIE generates calls (tests/test_sofie.py), and Chromium, which
# loads Model Explorer's page (tests/test_visualize.py). Without root or apt-get it says what
# is missing and goes on.
SYSTEM_PACKAGES := libopenblas-dev chromium
system-packages:
	@need=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || need="$$need $$p"; done; \
	if [ -z "$$need" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "system-packages: missing$$need; install them as root (apt-get install$$need)" >&2; exit 0; fi; \
	echo "system-packages: installing$$need"; export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q --no-install-recommends $$need >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$need >/dev/null; }

test: $(STAMP) system-packages
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP) system-packages
	$(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

test-all: $(STAMP) system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts tools
	$(BIN)/ruff format --check src tests scripts tools

format: $(STAMP)
	$(BIN)/ruff format src tests scripts tools
	$(BIN)/ruff check --fix src tests scripts tools

clean-runs:
	rm -rf logs outputs multirun

# The C++ consumer (cpp/): libtorch from the wheel, built into build/cpp, rebuilt only when
# its sources change; `make test` builds it too. Usage: build/cpp/replay EXPORT_DIR GOLDEN_DIR
.PHONY: cpp
cpp: $(STAMP)
	$(BIN)/python cpp/build.py

# The same with the CUDA path (soa::Model on device pointers), where a CUDA toolkit is
# present, into build/cpp-cuda. Usage: build/cpp-cuda/replay EXPORT GOLDEN --device cuda
.PHONY: cpp-cuda
cpp-cuda: $(STAMP)
	$(BIN)/python cpp/build.py --cuda
