# The two commands a fresh clone needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,endpoint]'
	touch $(STAMP)

install: $(STAMP)

## demo: run the gateway on embedded defaults with the fake model server (Ctrl-C stops both)
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash deploy/demo.sh

## test: run the whole test suite (SQLite and in-process cache unless DATABASE_URL / REDIS_URL are set)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy gateway resource_server compute_functions tools
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy gateway resource_server compute_functions tools

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
