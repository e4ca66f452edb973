# Two entry points for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.mtlxray-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo demo-study test test-fast test-gpu bench clean

# torch goes first and pinned: left to resolve freely it pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION)
	$(BIN)/pip install -q -e '.[dev,bench,export,zoo,track]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mtlxray demo --out runs/demo

# The demo over seeds 0-2 in fp32 and bf16 as one sweep, on the demo's shards (docs/sweeps.md).
demo-study: $(STAMP)
	test -f runs/demo/shards/manifest.json || $(BIN)/mtlxray demo --out runs/demo
	$(BIN)/mtlxray sweep --config configs/demo.yaml --then configs/demo_phase2.yaml --seeds 0 1 2 \
		--grid run.precision=fp32,bf16 --executor local --eval-subset lung --eval-subset infection \
		--out runs/demo_study
	$(BIN)/mtlxray compare --sweep runs/demo_study

test: $(STAMP)
	$(BIN)/python -m pytest -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not slurm and not slow"

# On a GPU node: the tests that need CUDA (tests/gpu); `make test` collects them and skips them without one.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -ra -s -m gpu tests/gpu

bench: $(STAMP)
	$(BIN)/mtlxray bench all

clean:
	rm -rf runs/* .pytest_cache build dist *.egg-info
