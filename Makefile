# The same commands locally and in CI. `make run` serves on the embedded defaults;
# `make test` runs the whole test suite. Both create .venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
INSTALL := $(PIP) install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: run test lint bench lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(INSTALL) -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(INSTALL) -e '.[dev]'
	@touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/imagegraph serve

# On every core (pytest-xdist); `.venv/bin/pytest path::test` runs one test in this process.
test: $(VENV)/.installed-dev
	$(BIN)/pytest -n auto

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/orchestration.py
	$(BIN)/python benchmarks/providers.py --submit-concurrency 50
	$(BIN)/python benchmarks/batch.py

# Re-pin constraints.txt from a fresh environment after changing pyproject.toml.
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/pip install --quiet --upgrade pip && .lockenv/bin/pip install --quiet -e '.[dev]'
	# torch's local label (+cpu) is dropped so the pin also matches the registry's build.
	.lockenv/bin/pip freeze --exclude-editable | grep -v '^-e' \
		| sed -E 's/^(torch==[^+]+)\+.*/\1/' > constraints.txt
	rm -rf .lockenv

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
