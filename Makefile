# The two commands of the README: `make run` and `make test`. Both need only Python 3.11+.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' && echo $$p && break; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Extras installed with the package: CI adds the kernel front ends, Ray and the model compiler (see .ci/run).
EXTRAS ?= test

.PHONY: install run test lint typecheck unit gpu bench-cpu clean

$(STAMP): setup.cfg pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: Python 3.11 or newer is required (none found on PATH)"; exit 1; }
	@echo "creating $(VENV) with $(PYTHON) and installing kaas ..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/python -m tools.demo

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy broker tenantlib tools bench

unit: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: lint typecheck unit

# The GPU suite. On a machine that cannot install (no network: the lent GPU machine) use the
# Python found there as it is: `make gpu SYSTEM_PYTHON=1`.
ifeq ($(SYSTEM_PYTHON),1)
GPU_DEPS :=
GPU_PY := python3
else
GPU_DEPS := install
GPU_PY := $(BIN)/python
endif

gpu: $(GPU_DEPS)
	$(GPU_PY) -m pytest -q -m gpu $(PYTEST_ARGS)

bench-cpu: install
	$(BIN)/kaas-bench latency --device cpu --iterations 2000
	$(BIN)/kaas-bench bandwidth --device cpu --max-size 256M

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
