# Developer and CI entry points. Everything runs inside a project-local virtualenv
# (.venv); install stamps live inside it, so `make clean` resets them too.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Only the folders that exist: a fresh clone has no empty benchmarks/ or examples/.
LINT_PATHS := $(wildcard src tests benchmarks examples tools)

# The Python versions offload supports: `make test-matrix` runs the suite on each.
PYTHONS ?= 3.10 3.11 3.12 3.13

.PHONY: all demo test suite test-python test-matrix print-pythons test-unit test-process \
	test-network bench dist docs lint format clean

all: test

# pip >= 25.1 reads pyproject.toml's [dependency-groups] (`pip install --group dev`).
$(VENV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade 'pip>=25.1'

# Install stamps: re-install whenever pyproject.toml changes.
# compileall: workers start measurably faster from bytecode, and some environments set
# PYTHONDONTWRITEBYTECODE so imports never write it themselves.
$(VENV)/.installed: pyproject.toml | $(VENV)
	$(BIN)/pip install -q -e .
	$(BIN)/python -m compileall -q src >/dev/null
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(VENV)
	$(BIN)/pip install -q -e . --group dev
	$(BIN)/python -m compileall -q src >/dev/null
	touch $@

$(VENV)/.bench-installed: pyproject.toml | $(VENV)
	$(BIN)/pip install -q -e . --group dev --group bench
	$(BIN)/python -m compileall -q src >/dev/null
	touch $@

$(VENV)/.dist-installed: pyproject.toml | $(VENV)
	$(BIN)/pip install -q --group dist
	touch $@

$(VENV)/.docs-installed: pyproject.toml | $(VENV)
	$(BIN)/pip install -q --group docs
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python examples/demo.py

test: $(VENV)/.dev-installed
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy --strict src/offload
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite alone (no lint), in $(VENV).
suite: $(VENV)/.dev-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite on Python $(PY) (e.g. `make test-python PY=3.12`), in its own virtualenv
# .venv-$(PY); tools/find-python finds the interpreter, or fails saying where it looked.
test-python:
	@test -n "$(PY)" || { echo "usage: make test-python PY=3.12" >&2; exit 2; }
	@python=$$(tools/find-python $(PY)) && \
		$(MAKE) --no-print-directory suite VENV=.venv-$(PY) PYTHON="$$python"

# The suite on every supported Python, one after the other (.ci/run runs them in parallel).
test-matrix:
	@for py in $(PYTHONS); do $(MAKE) --no-print-directory test-python PY=$$py || exit 1; done

print-pythons:
	@echo $(PYTHONS)

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

# The sdist and wheel: built (the wheel from the sdist), metadata checked by twine, the
# wheel's contents and the sdist's test suite checked by tools/check_dist.py.
dist: $(VENV)/.dist-installed $(VENV)/.dev-installed
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*
	$(BIN)/python tools/check_dist.py dist

# The user guide and API reference (mkdocs.yml, docs/) into site/; every warning is an
# error. (Its examples run in the test suite: tests/test_docs_examples.py.)
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy --strict src/offload

format: $(VENV)/.dev-installed
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

clean:
	rm -rf $(VENV) .venv-* build dist site src/*.egg-info *.egg-info \
		.mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
