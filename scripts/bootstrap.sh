#!/usr/bin/env bash
# Set up everything the project needs on a fresh machine: system packages (redis-server, chromium
# for the browser tests), a virtualenv with the project and its test extra. Idempotent and
# non-interactive, so CI (no stdin) and a new developer run the very same thing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-}

# apt-get, waiting up to 5 minutes while another apt holds its locks (a second bootstrap, a
# system update just after boot): apt-get update does not wait itself (DPkg::Lock::Timeout covers
# only the dpkg lock), and failing there made a CI run red for a race with nothing to do with it.
apt_get() {
  local attempt output
  for attempt in $(seq 60); do
    if output=$(apt-get -o DPkg::Lock::Timeout=5 "$@" 2>&1); then
      return 0
    fi
    if ! grep -q "Could not get lock" <<<"$output"; then
      echo "$output" >&2
      return 1
    fi
    [ "$attempt" = 1 ] && echo "bootstrap: another apt-get holds its lock; waiting" >&2
    sleep 5
  done
  echo "$output" >&2
  return 1
}

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ "${EVENTBUS_SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
  need_apt+=(chromium)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing ${need_apt[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt_get update -qq
    apt_get install -y -qq --no-install-recommends "${need_apt[@]}"
  else
    echo "bootstrap: please install: ${need_apt[*]} (needs root and apt-get)" >&2
    exit 1
  fi
fi

if [ -z "$PYTHON" ]; then
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PYTHON=$candidate; break
    fi
  done
fi
[ -n "$PYTHON" ] || { echo "bootstrap: Python >= 3.11 is required" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ "${EVENTBUS_LATEST:-0}" = 1 ]; then
  # `make test-latest`: the newest versions pyproject.toml allows, to review an upgrade before
  # `make lock` records it. The build backend too (build-system.requires, as the lock pins it):
  # else the venv keeps the setuptools its Python bundles, too old for pyproject.toml, and
  # tests/test_wheel_install.py, which builds without isolation, cannot build the wheel.
  mapfile -t build_requires < <("$VENV/bin/python" -c 'import tomllib
print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")')
  "${PIP[@]}" -U pip "${build_requires[@]}"
  "${PIP[@]}" -U --upgrade-strategy eager -e ".[test]"
else
  # Exactly what CI tested: every package (build backend included) pinned with its hashes in
  # requirements/lock.txt, so an upstream release cannot change a fresh install.
  "${PIP[@]}" --require-hashes -r requirements/lock.txt
  "${PIP[@]}" --no-deps --no-build-isolation -e .
fi
echo "bootstrap: ready ($("$VENV/bin/python" --version), $(redis-server --version | cut -d' ' -f3))"
