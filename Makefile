# Everything runs inside a local virtual environment, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint bench-samplers clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,parity]"
	touch $(STAMP)

# The test command of the README and of CI.
test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check jaxdiff tests benchmarks

# Sampler accuracy on a Gaussian mixture (writes benchmarks/out/samplers_gmm.{md,png,json}).
bench-samplers: install
	$(BIN)/python benchmarks/samplers_gmm.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
