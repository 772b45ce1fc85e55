# Developer and CI entry points. Everything runs inside a project-local virtualenv
# (.venv); install stamps live inside it, so `make clean` resets them too.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Only the folders that exist: a fresh clone has no empty benchmarks/ or examples/.
LINT_PATHS := $(wildcard src tests benchmarks examples)

.PHONY: all demo test test-unit test-process test-network bench lint format clean

all: test

$(VENV):
	$(PYTHON) -m venv $(VENV)
	-$(BIN)/pip install -q --upgrade pip

# Install stamps: re-install whenever pyproject.toml changes.
# compileall: workers start measurably faster from bytecode, and some environments set
# PYTHONDONTWRITEBYTECODE so imports never write it themselves.
$(VENV)/.installed: pyproject.toml | $(VENV)
	$(BIN)/pip install -q -e .
	$(BIN)/python -m compileall -q src >/dev/null
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m compileall -q src >/dev/null
	touch $@

$(VENV)/.bench-installed: pyproject.toml | $(VENV)
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m compileall -q src >/dev/null
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python examples/demo.py

test: $(VENV)/.dev-installed
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy --strict src/offload
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# One tier of tests at a time (tests/conftest.py assigns the tiers; `make test` runs all).
# unit: no processes, no sockets. process: real local workers. network: sockets and servers.
test-unit: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

test-process: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -m process $(PYTEST_ARGS)

test-network: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -m network $(PYTEST_ARGS)

bench: $(VENV)/.bench-installed
	$(BIN)/python -m compileall -q src >/dev/null  # workers start from fresh bytecode
	$(BIN)/python -m benchmarks

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy --strict src/offload

format: $(VENV)/.dev-installed
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info *.egg-info \
		.mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
