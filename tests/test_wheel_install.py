"""The package as a user installs it: the wheel, in a clean venv outside the repository.

CI builds the wheel from the working tree, creates a virtualenv in a temporary directory, installs
the runtime dependencies exactly as the container image does (``requirements/runtime.txt`` with
``--require-hashes``), then the wheel alone (``--no-deps``), and starts the installed
``eventbus-gateway``: it must serve ``/readyz`` and the browser client ``/eventbus.js`` from the
installed package data, with nothing of the repository on its import path. About 20 s.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
_PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: What the wheel is built from: pyproject.toml, its readme, and the packages it includes.
SOURCES = [
    "pyproject.toml",
    _PROJECT["project"]["readme"],
    *(p.rstrip("*") for p in _PROJECT["tool"]["setuptools"]["packages"]["find"]["include"]),
]

pytestmark = pytest.mark.slow


def _run(*command: str | Path, cwd: Path, timeout: float = 120) -> str:
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _clean_env() -> dict[str, str]:
    # Nothing of this checkout or its venv: no PYTHONPATH, no VIRTUAL_ENV, no EVENTBUS_* settings.
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("EVENTBUS_")
    }


def test_the_venv_has_the_build_backend_pyproject_asks_for():
    """The wheel below is built without isolation, by this venv's setuptools: scripts/bootstrap.sh
    installs one that build-system.requires allows (the lock's; the newest under
    ``make test-latest``), not the older one that ``python -m venv`` bundles."""
    from packaging.requirements import Requirement

    for requirement in map(Requirement, _PROJECT["build-system"]["requires"]):
        version = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{requirement.name} {version} in {sys.prefix}, pyproject.toml needs {requirement}"
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv outside the repository with the runtime dependencies and the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    assert not tmp.resolve().is_relative_to(ROOT)
    # Build from a copy, so that setuptools' build/ and *.egg-info never land in the checkout.
    source = tmp / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    dist = tmp / "dist"
    _run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "--no-index", "-w", dist, source,
        cwd=tmp,
    )  # fmt: skip
    wheels = list(dist.glob("eventbus-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run(*pip, "--require-hashes", "-r", ROOT / "requirements" / "runtime.txt", cwd=tmp)
    _run(*pip, "--no-deps", wheels[0], cwd=tmp)
    return venv


def test_the_wheel_carries_the_package_data(installed):
    where = _run(
        installed / "bin" / "python", "-c",
        "import gateway, schemas, serverkit, pathlib; "
        "[print(pathlib.Path(m.__file__).parent) for m in (gateway, schemas, serverkit)]",
        cwd=installed.parent,
    ).split()  # fmt: skip
    gateway_dir, schemas_dir, serverkit_dir = (Path(p) for p in where)
    assert gateway_dir.is_relative_to(installed) and schemas_dir.is_relative_to(installed)
    assert serverkit_dir.is_relative_to(installed)  # the publisher's HTTP API needs it too
    assert (gateway_dir / "static" / "eventbus.js").is_file()
    assert (gateway_dir / "static" / "eventbus.d.ts").is_file()
    assert (schemas_dir / "eventbus.schema.json").is_file()
    usage = _run(installed / "bin" / "eventbus-publish", "--help", cwd=installed.parent)
    assert usage.startswith("usage: eventbus-publish")


def test_installed_gateway_serves_readyz_and_the_browser_client(installed, redis_url):
    port = free_port()
    log = installed.parent / "gateway.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                installed / "bin" / "eventbus-gateway", "--no-auth", "--port", str(port),
                "--redis-url", redis_url, "--log-format", "json",
            ],
            cwd=installed.parent, env=_clean_env(), stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "not ready in 30 s:\n" + log.read_text()
                time.sleep(0.1)
        with urllib.request.urlopen(f"{base}/eventbus.js", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/javascript")
            served = response.read()
        assert served == (ROOT / "gateway" / "static" / "eventbus.js").read_bytes()
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
