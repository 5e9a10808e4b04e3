# Quick start on a fresh machine: `make demo` and `make test`. Both bootstrap what is missing.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt pyproject.toml | sha1sum | cut -c1-12)
# The SAM CLI pins its own boto3/cfn-lint: a venv of its own, used only for `sam validate --lint`.
SAM_VENV := .venv-sam
SAM_STAMP := $(SAM_VENV)/.installed-$(shell sha1sum requirements-sam.txt | cut -c1-12)
PYTEST_ARGS ?=
# The suite is latency-bound (Lambda cold starts, ECS task start-up, polls): two pytest workers,
# each running whole test files (module fixtures deploy a stack once per file).
PYTEST_WORKERS ?= 2

.PHONY: bootstrap redis venv sam-venv test lint demo bench bench-capture bench-restore clean

bootstrap: redis venv

# Debian's redis-server/redis-tools (7.0.15) run the redis:<ver> images of the embedded ECS (cache nodes).
redis:
	@if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null || ! command -v redis-check-rdb >/dev/null; then \
	  echo "installing redis-server redis-tools (apt)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server redis-tools >/dev/null; \
	fi
	@# Valkey 8 (what the embedded ECS runs for valkey/valkey images): Debian bookworm-backports.
	@if ! command -v valkey-server >/dev/null && . /etc/os-release && [ "$$VERSION_CODENAME" = bookworm ]; then \
	  echo "installing valkey-server from bookworm-backports (apt)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/ || \
	    echo "deb http://deb.debian.org/debian bookworm-backports main" | $$SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null; \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq -t bookworm-backports valkey-server >/dev/null ) \
	    || echo "valkey-server not installed: Valkey caches and restores need it"; \
	fi

venv: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	@rm -f $(VENV)/.installed-* && touch $@

sam-venv: $(SAM_STAMP)

$(SAM_STAMP):
	@test -x $(SAM_VENV)/bin/python || $(PY) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/python -m pip install -q -r requirements-sam.txt
	@rm -f $(SAM_VENV)/.installed-* && touch $@

# ASL: tests/unit/test_state_machine_definitions.py validates every state machine with its
# DefinitionSubstitutions filled (statelint and cfn-lint's definition schema), part of pytest.
lint: venv sam-venv
	$(BIN)/ruff check .
	$(BIN)/cfn-lint template.yaml
	SAM_CLI_TELEMETRY=0 $(SAM_VENV)/bin/sam validate --lint --template template.yaml --region us-east-1

test: bootstrap lint
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: bootstrap
	$(BIN)/cachevault demo

# The benchmarks (up to 1 GB): explicit, never part of `make test`. Sizes: BENCH_SIZES="256 512 1024".
# `all`: the CLI commands end to end (both dataset shapes, bench/results/e2e-*), then the components.
BENCH_SIZES ?= 256 512 1024
bench: bootstrap
	$(BIN)/cachevault bench all $(foreach s,$(BENCH_SIZES),--size-mb $(s))

bench-capture: bootstrap
	$(BIN)/cachevault bench capture --size-mb $${BENCH_SIZE_MB:-1024}

bench-restore: bootstrap
	$(BIN)/cachevault bench restore --size-mb $${BENCH_SIZE_MB:-1024}

clean:
	-$(BIN)/cachevault local down 2>/dev/null
	rm -rf .cachevault .pytest_cache .ruff_cache .venv-sam
