# Two commands: `make demo` (an SSR run on the embedded defaults) and `make test`.
# Both create .venv if missing and install the package; on a machine without CUDA the CPU
# build torch==2.13.0 goes in first (an unpinned torch would pull a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CONFIG ?= configs/demo.toml

.PHONY: setup demo test lint format bench experiment clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py CMakeLists.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	# Liger-Kernel is a test peer for the fused cross-entropy (its deps would pull a CUDA torch).
	$(PY) -m pip install -q --no-deps liger-kernel==0.8.5
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ssrengine.models fetch smollm2-135m
	$(PY) -m ssrengine.train --config $(CONFIG)

test: $(STAMP) lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf build *.egg-info runs
