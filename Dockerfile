# syntax=docker/dockerfile:1
#
# The event bus gateway image (default target) and the demo backend (`--target demo`).
#
#   docker build -t eventbus-gateway .
#   docker run --rm -p 8765:8765 -e EVENTBUS_REDIS_URL=redis://redis:6379/0 \
#       -e EVENTBUS_AUTH_SECRET=... eventbus-gateway
#
# Configuration is environment variables (EVENTBUS_*) or flags appended to `docker run`; every
# setting is listed by `docker run --rm eventbus-gateway --help` and in docs/operations.md:
#   EVENTBUS_REDIS_URL        redis://host:6379/0, rediss://..., or redis+cluster://host:port
#   EVENTBUS_AUTH_SECRET      HS256 secret shared with the backends that mint browser tokens
#   EVENTBUS_NO_AUTH          1 = development mode without tokens (never in production)
#   EVENTBUS_ALLOWED_ORIGINS  comma-separated Origin allowlist for WebSocket handshakes
#   EVENTBUS_DRAIN_TIMEOUT    seconds to move clients off after SIGTERM (default 20)
#   EVENTBUS_HOST / EVENTBUS_PORT / EVENTBUS_LOG_FORMAT: set below for a container
#
# Only pyproject.toml and the packages are copied (see .dockerignore), so the image holds no
# tests, virtualenvs or secrets from the build context.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the project and its dependencies into a self-contained virtualenv ---------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/eventbus
WORKDIR /src
# README.m[d]: copied when present (pyproject names it as the long description) without making
# the build fail on a checkout that lacks it.
COPY pyproject.toml README.m[d] ./
COPY requirements/runtime.txt ./requirements/
COPY schemas ./schemas
COPY redisconn ./redisconn
COPY serverkit ./serverkit
COPY publisher ./publisher
COPY gateway ./gateway
COPY consumer ./consumer
# A regular (non-editable) install: the runtime stage needs the venv only, not /src. Bytecode is
# compiled here because the runtime filesystem is meant to be read-only.
# Dependencies and the build backend come pinned with hashes from requirements/runtime.txt (the
# versions CI tested), so a rebuild cannot pick up an upstream release.
RUN /opt/eventbus/bin/pip install --require-hashes -r requirements/runtime.txt \
    && /opt/eventbus/bin/pip install --no-deps --no-build-isolation . \
    && /opt/eventbus/bin/python -m compileall -q /opt/eventbus/lib

# --- base: slim runtime with the virtualenv and an unprivileged user ---------------------------
FROM ${PYTHON_IMAGE} AS base
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can verify it without a passwd file
# lookup and volume ownership is predictable.
RUN groupadd --system --gid 10001 eventbus \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin eventbus
COPY --from=build /opt/eventbus /opt/eventbus
ENV PATH=/opt/eventbus/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EVENTBUS_LOG_FORMAT=json
WORKDIR /
USER 10001:10001

# --- demo: the dashboard demo backend (examples/), for compose.yaml ---------------------------
FROM base AS demo
USER root
COPY examples /app/examples
# The demo keeps its SQLite file in /data (a volume in compose.yaml); a new named volume takes
# the ownership of this directory, so the unprivileged user can write there.
RUN mkdir -p /data && chown 10001:10001 /data
USER 10001:10001
WORKDIR /app
ENV EVENTBUS_DASHBOARD_HOST=0.0.0.0 \
    EVENTBUS_DASHBOARD_PORT=8000 \
    EVENTBUS_DASHBOARD_DB=/data/dashboard.sqlite3
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/api/config' % os.environ.get('EVENTBUS_DASHBOARD_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["python", "-m", "examples.dashboard.server"]

# --- gateway: the default target ---------------------------------------------------------------
FROM base AS gateway
# Listen on every interface inside the container (the gateway's own default is 127.0.0.1).
ENV EVENTBUS_HOST=0.0.0.0 \
    EVENTBUS_PORT=8765
EXPOSE 8765
# No curl in slim images: the standard library does the probe. urlopen raises on a refused
# connection, a timeout or any non-2xx status, and an uncaught exception exits 1 (unhealthy).
# The port follows EVENTBUS_PORT, so overriding the port keeps the check right.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EVENTBUS_PORT', '8765'), timeout=2)"]
# Exec form: python is PID 1 and receives SIGTERM itself (a shell wrapper would swallow it). The
# gateway handles SIGTERM by draining: /readyz turns 503, the listener closes, and clients are
# closed with 1012 in batches within EVENTBUS_DRAIN_TIMEOUT so they resume on another pod.
# Give the container a stop timeout longer than that (compose: stop_grace_period; k8s:
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "gateway"]
