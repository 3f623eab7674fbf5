"""The README's promises: its first commands, a configuration table that matches the code, and
its publishing snippet and shell lines working as written against a running `make run`."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.config import markdown_table
from schemas.keys import Keys

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_starts_with_the_run_and_test_commands():
    first_block = README.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make run", "make test"]


def test_readme_configuration_table_is_generated_from_the_config_struct():
    assert markdown_table() in README, (
        "README's configuration table is stale: paste the output of "
        "`python -c 'from gateway.config import markdown_table; print(markdown_table())'`"
    )


# --- the README's commands and snippets, as written, against a running `make run` -------------

ROOT = Path(__file__).resolve().parents[1]


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def running_demo(tmp_path_factory) -> Iterator[dict[str, str]]:
    """``make run`` (its command, without simulated agents, on free ports): the environment it
    printed to use against it, and the dashboard's URL."""
    tmp = tmp_path_factory.mktemp("readme-demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.dashboard.run", "--port", "0", "--gateway-port", "0",
         "--no-agents", "--db", str(tmp / "demo.sqlite3")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output = ""
    try:
        deadline = time.monotonic() + 60
        while "Press Ctrl-C" not in output:
            line = process.stdout.readline()
            assert line and time.monotonic() < deadline, f"make run did not start:\n{output}"
            output += line
        exports = dict(re.findall(r"^\s+export (EVENTBUS_\w+)=(\S+)$", output, flags=re.M))
        assert "EVENTBUS_REDIS_URL" in exports, output
        dashboard = re.search(r"Dashboard\s+(http://\S+)", output).group(1)
        yield {**env, **exports, "DASHBOARD": dashboard, "OUTPUT": output, "DIR": str(tmp)}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def _stream(redis_url: str, project: int) -> list[dict]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(f[b"f"]) for _, f in client.xrange(Keys().stream(project))]
    finally:
        client.close()


def test_publishing_snippet_works_as_written_against_make_run(running_demo, tmp_path):
    snippet = _blocks(_section("Publishing events"), "python")[0]
    assert 'os.environ.get("EVENTBUS_REDIS_URL"' in snippet
    script = tmp_path / "publish_demo.py"
    script.write_text(snippet)
    env = {k: v for k, v in running_demo.items() if k not in ("DASHBOARD", "OUTPUT", "DIR")}
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    redis_url = running_demo["EVENTBUS_REDIS_URL"]
    events = _stream(redis_url, 2)[-4:]
    assert [e["type"] for e in events] == [
        "blocker_created", "blocker_resolved", "agent_resumed", "blocker_expired",
    ]  # fmt: skip
    assert _stream(redis_url, 1) == []  # the demo backend's own project is left alone


def test_shell_lines_work_as_written_against_make_run(running_demo):
    block = next(b for b in _blocks(_section("Publishing events"), "sh") if "eventbus-publish" in b)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    env = {k: v for k, v in running_demo.items() if k not in ("DASHBOARD", "OUTPUT", "DIR")}
    port = urllib.parse.urlsplit(running_demo["DASHBOARD"]).port
    for line in lines:
        if line.startswith("export "):
            continue  # the value is the running demo's: in env already
        command = line.replace("127.0.0.1:8000", f"127.0.0.1:{port}")  # the demo took a free port
        result = subprocess.run(
            ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, (line, result.stdout, result.stderr)
        if "curl" in line:
            assert json.loads(result.stdout)["status"] == "PENDING", result.stdout
    assert _stream(running_demo["EVENTBUS_REDIS_URL"], 2)[-1]["type"] == "blocker_resolved"


def test_make_run_prints_the_readme_lines(running_demo):
    output = running_demo["OUTPUT"]
    assert re.search(r"export EVENTBUS_REDIS_URL=redis://127\.0\.0\.1:\d+/0$", output, re.M)
    assert ".venv/bin/eventbus-publish publish '" in output
    assert "make shell" in output


def test_make_shell_has_the_commands_and_the_demos_environment(running_demo, tmp_path):
    # This module's demo saves its environment next to its own database, not in the default
    # examples/dashboard/data/demo.env: DEMO_ENV points make there. "-o install": the venv is
    # there already (a test never reinstalls it).
    env_file = Path(running_demo["DIR"]) / "demo.env"
    assert f"make shell DEMO_ENV={env_file}" in running_demo["OUTPUT"]
    result = subprocess.run(
        ["make", "-s", "-o", "install", f"DEMO_ENV={env_file}", "shell"],
        cwd=ROOT,
        input=(
            'echo "url=$EVENTBUS_REDIS_URL"; command -v eventbus-publish\n'
            # The banner's line: tail follows the Sandbox with the demo's secret and gateway.
            'seq=$(eventbus-publish publish \'{"type":"blocker_resolved","project_id":2,'
            '"blocker_id":77,"answer":"tailed","resolved_at":"2025-11-08T12:45:30Z"}\''
            " | sed -E 's/.*\"seq\":([0-9]+).*/\\1/')\n"
            'eventbus-publish tail 2 --after "$((seq - 1))" --count 1 --json\n'
        ),
        env={**os.environ, "SHELL": "/bin/bash"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"url={running_demo['EVENTBUS_REDIS_URL']}" in result.stdout
    lines = result.stdout.strip().splitlines()
    assert any(line.endswith(".venv/bin/eventbus-publish") for line in lines), lines
    assert json.loads(lines[-1])["answer"] == "tailed", result.stderr


def test_readme_documents_the_set_up_variables_a_user_sets():
    # scripts/bootstrap.sh (every make target's set-up) reads these; those the Makefile sets
    # itself (make test-latest) are internal, the others are for users and must be documented.
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    makefile = (ROOT / "Makefile").read_text()
    read = set(re.findall(r"\$\{(EVENTBUS_[A-Z_]+)", bootstrap))
    internal = {name for name in read if f"{name}=" in makefile}
    assert "EVENTBUS_SKIP_BROWSER" in read - internal
    for name in read - internal:
        assert name in README, f"README does not mention {name} (read by scripts/bootstrap.sh)"
