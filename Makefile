# Every target sets up what it needs first (venv, packages, redis-server, chromium): on a fresh
# machine `make run` and `make test` are the only two commands.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_ENV := examples/dashboard/data/demo.env

.PHONY: install test test-fast test-latest lock lint format run shell gateway bench bench-socketio soak \
	schema clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt scripts/bootstrap.sh
	VENV=$(VENV) scripts/bootstrap.sh
	@touch $(STAMP)

## The whole suite: lint, unit, real Redis, gateway end to end, browser tests.
test: install lint
	$(PY) -m pytest

## The whole suite against the newest versions pyproject.toml allows (a separate venv): run it
## before `make lock` so that an upgrade is a deliberate, reviewed change.
test-latest:
	EVENTBUS_LATEST=1 VENV=.venv-latest scripts/bootstrap.sh
	.venv-latest/bin/python -m pytest

## Re-resolve requirements/lock.txt (everything, pinned with hashes) and requirements/runtime.txt
## (the same versions, without the test extra: the container image) from pyproject.toml.
lock:
	test -x .venv-lock/bin/pip-compile || { python3 -m venv .venv-lock && \
		.venv-lock/bin/python -m pip install -q pip-tools==7.6.2; }
	.venv-lock/bin/pip-compile -q --upgrade --extra test --all-build-deps --generate-hashes \
		--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
		-o requirements/lock.txt pyproject.toml
	.venv-lock/bin/pip-compile -q --all-build-deps --generate-hashes --allow-unsafe \
		--strip-extras --no-emit-index-url --no-emit-find-links \
		--extra postgres --extra http-api \
		-c requirements/lock.txt -o requirements/runtime.txt pyproject.toml

## Without the browser tests.
test-fast: install
	$(PY) -m pytest -m "not browser"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check schemas redisconn serverkit publisher gateway consumer

format: install
	$(VENV)/bin/ruff format schemas redisconn serverkit publisher gateway consumer
	$(VENV)/bin/ruff check --fix .

## Gateway + demo backend + simulated agents (+ a private Redis when none is configured).
run: install
	$(PY) -m examples.dashboard.run

## A shell with .venv/bin first on PATH (eventbus-publish, eventbus-gateway, python) and, while
## `make run` runs, its environment (EVENTBUS_REDIS_URL, from examples/dashboard/data/demo.env).
shell: install
	@if [ -f "$(DEMO_ENV)" ]; then . "$(abspath $(DEMO_ENV))"; \
		echo "make shell: .venv/bin on PATH; EVENTBUS_REDIS_URL=$$EVENTBUS_REDIS_URL (the running demo)"; \
	else echo "make shell: .venv/bin on PATH; no demo running (start one with make run)"; fi; \
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" VIRTUAL_ENV="$(CURDIR)/$(VENV)" exec $${SHELL:-/bin/sh}

## The gateway alone, in development mode (no auth), against EVENTBUS_REDIS_URL or localhost.
gateway: install
	$(PY) -m gateway --no-auth

bench: install bench-socketio
	$(PY) -m bench

## The socket.io baseline of the gateway benchmark (bench/socketio): `npm ci` of its committed
## lock file (exact versions, no install scripts) into bench/socketio/node_modules. Needs Node.js
## 20 or later and the npm registry; the bench smoke tests run it too.
SOCKETIO_STAMP := bench/socketio/node_modules/.installed

bench-socketio: $(SOCKETIO_STAMP)

$(SOCKETIO_STAMP): bench/socketio/package.json bench/socketio/package-lock.json
	cd bench/socketio && npm ci --ignore-scripts --no-audit --no-fund
	@touch $@

soak: install
	$(PY) -m bench.soak

## Regenerate the committed JSON Schema export.
schema: install
	$(PY) -m schemas > schemas/eventbus.schema.json

clean:
	rm -rf $(VENV) .venv-latest .venv-lock .pytest_cache .ruff_cache build *.egg-info \
		bench/socketio/node_modules
