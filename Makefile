# `make demo` and `make test` each do all set-up on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
GPU     := $(VENV)/.installed-gpu
DATA    := /usr/share/datasets/fashion-mnist

.PHONY: demo test setup gpu data lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned here first: on these machines torch==2.13.0 is a CPU build on local disk,
# while an unpinned torch would pull a multi-GB CUDA build. The package itself says torch>=2.3.
# The C++ extension bnkit._C is compiled here, against that torch (--no-build-isolation),
# and again whenever a source under src/bnkit/csrc changes.
CSRC    := $(wildcard src/bnkit/csrc/*.cpp src/bnkit/csrc/*.h)

$(STAMP): pyproject.toml setup.py $(CSRC) | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip setuptools
	$(BIN)/pip install -q torch==2.13.0 numpy  # numpy before the build: torch warns without it
	$(BIN)/pip install -q --no-build-isolation -e '.[dev,lab]'
	touch $(STAMP)

# Triton (about 1 GB), the GPU backend. `make test` always installs it, so the GPU kernels
# are tested in Triton's interpreter on any machine; `make demo` only where a GPU is present.
$(GPU): $(STAMP)
	-$(BIN)/pip install -q --no-build-isolation -e '.[gpu]' || echo "note: no Triton wheel for this platform; GPU kernels untested here"
	touch $(GPU)

setup: $(STAMP)

gpu: $(GPU)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
data:
	@if [ -d $(DATA) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' or set BNKIT_DATA to a folder of the IDX files"; fi

# The lab's quick suite (about 5 minutes on 2 cores), then where its report is.
# `bnkit demo` (the one-minute MLP comparison) remains available as a command.
demo: setup data
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then $(MAKE) -s gpu; fi
	@run=runs/$$(date +%Y%m%d-%H%M%S); \
	$(BIN)/bnkit lab --quick --out $$run && \
	echo "Report: $$run/report.html (one self-contained file; report.md beside it)"

test: setup gpu
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache src/bnkit/_C*.so src/bnkit/_C.unbuilt
