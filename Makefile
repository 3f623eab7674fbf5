# Every target sets up what it needs first (venv, packages, redis-server, chromium): on a fresh
# machine `make run` and `make test` are the only two commands.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format run gateway bench soak schema clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) scripts/bootstrap.sh
	@touch $(STAMP)

## The whole suite: lint, unit, real Redis, gateway end to end, browser tests.
test: install lint
	$(PY) -m pytest

## Without the browser tests.
test-fast: install
	$(PY) -m pytest -m "not browser"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check schemas publisher gateway

format: install
	$(VENV)/bin/ruff format schemas publisher gateway
	$(VENV)/bin/ruff check --fix .

## Gateway + demo backend + simulated agents (+ a private Redis when none is configured).
run: install
	$(PY) -m examples.dashboard.run

## The gateway alone, in development mode (no auth), against EVENTBUS_REDIS_URL or localhost.
gateway: install
	$(PY) -m gateway --no-auth

bench: install
	$(PY) -m bench

soak: install
	$(PY) -m bench.soak

## Regenerate the committed JSON Schema export.
schema: install
	$(PY) -m schemas > schemas/eventbus.schema.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
