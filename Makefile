# PlanetServe: `make demo` runs a local network, `make test` runs every check CI runs.
# Both bootstrap what they need on first use (.venv, node_modules, compiled contracts) and are
# no-op installs afterwards: each step is keyed on a stamp file newer than its inputs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: all bootstrap demo net test lint typecheck pytest bench clean

all: bootstrap

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[torch,dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

build/contracts/.compiled: node_modules/.installed scripts/compile_contracts.js $(shell find contracts -name '*.sol')
	node scripts/compile_contracts.js
	touch $@

bootstrap: $(VENV)/.installed node_modules/.installed build/contracts/.compiled

demo: bootstrap
	$(BIN)/python -m scripts.demo

# A local network that stays up (separate processes) with the OpenAI endpoint on :8080; Ctrl-C or `ps-net down`.
net: bootstrap
	$(BIN)/ps-net up

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: bootstrap
	$(BIN)/mypy planetserve node verifier ledger cli tests bench scripts

pytest: bootstrap
	$(BIN)/python -m pytest -q --durations=25

test: lint typecheck pytest

bench: bootstrap
	$(BIN)/python bench/gas.py
	$(BIN)/python bench/privacy.py
	$(BIN)/python bench/sida.py
	$(BIN)/python bench/forwarding.py
	$(BIN)/python bench/anonymity.py
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/completion.py
	$(BIN)/python bench/wallet_loop.py

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
