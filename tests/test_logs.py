"""gateway.logs: a connection's logger is bound only when it writes a line."""

from __future__ import annotations

import structlog

from gateway import logs


def test_a_connection_log_binds_only_when_it_writes(monkeypatch):
    monkeypatch.setattr(logs, "_debug_enabled", False)  # as configure_logging("json", "info")
    built = []

    class Connection:
        @property
        def remote_address(self):
            built.append(1)
            return ("127.0.0.1", 5555)

    with structlog.testing.capture_logs() as captured:
        clog = logs.ConnectionLog(structlog.get_logger("gateway"), 7, connection=Connection())
        clog.debug("connected")  # debug is off: nothing bound, nothing written
        assert built == [] and captured == []
        clog.info("authentication failed", reason="expired")
        clog.warning("subscribe failed", project_id=3)
    assert built == [1]  # bound once
    assert captured == [
        {"event": "authentication failed", "reason": "expired", "conn_id": 7,
         "peer": "127.0.0.1:5555", "log_level": "info"},
        {"event": "subscribe failed", "project_id": 3, "conn_id": 7, "peer": "127.0.0.1:5555",
         "log_level": "warning"},
    ]  # fmt: skip


def test_configure_logging_says_whether_debug_lines_are_written(monkeypatch):
    import logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # restored after the test
    monkeypatch.setattr(logs, "_debug_enabled", True)
    level, before = root.level, structlog.get_config()
    try:
        logs.configure_logging("json", "info")
        assert logs._debug_enabled is False
        logs.configure_logging("json", "debug")
        assert logs._debug_enabled is True
    finally:
        structlog.configure(**before)
        root.setLevel(level)


def test_processes_sharing_an_unbuffered_output_write_whole_lines(tmp_path):
    # Workers of a group share stderr; the container image sets PYTHONUNBUFFERED. Each JSON line
    # must reach the output in one write, or two written at once interleave ('{..}{..}\n\n').
    import json
    import os
    import subprocess
    import sys

    script = (
        "from gateway.logs import configure_logging, get_logger\n"
        "configure_logging('json')\n"
        "log = get_logger('t')\n"
        "for n in range(20000):\n"
        "    log.info('line', n=n, pad='x' * 200)\n"
    )
    out = tmp_path / "out.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(out, "wb") as sink:
        writers = [
            subprocess.Popen([sys.executable, "-c", script], stderr=sink, env=env) for _ in range(2)
        ]
        for writer in writers:
            assert writer.wait(timeout=120) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 40000
    assert sum(1 for line in lines if json.loads(line)["event"] == "line") == 40000


def test_an_exception_without_a_message_is_logged_by_its_type():
    # A deadline (asyncio.timeout) raises a TimeoutError with no message: a warning about a
    # periodic check must still say what went wrong, not `error=`.
    assert logs.describe(TimeoutError()) == "TimeoutError"
    assert logs.describe(ConnectionError("Connection refused")) == "Connection refused"


def test_a_log_line_that_cannot_be_written_is_dropped_not_raised(monkeypatch):
    # stderr a pipe whose reader is gone: every write fails with EPIPE, and the line raised from
    # wherever it was logged (the supervisor's "stop signal" came before its stop).
    import logging
    import sys

    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # restored after the test
    monkeypatch.setattr(sys, "stderr", Gone())
    level, before = root.level, structlog.get_config()
    try:
        logs.configure_logging("json", "info")
        logger = logs.get_logger("eventbus.test")
        logger.info("stop signal", signal="SIGTERM")
        logger.error("worker exited during the stop", code=-9)
    finally:
        structlog.configure(**before)
        root.setLevel(level)


def test_the_gateways_log_level_is_taken_in_any_case_as_the_other_servers_take_it():
    """``--log-level INFO`` (or ``EVENTBUS_LOG_LEVEL=Warning``) was refused by the gateway only:
    the HTTP API and the outbox relay take any case, and ``critical``; so does the gateway."""
    import pytest

    from gateway.config import ConfigError, load_config

    assert load_config(["--no-auth", "--log-level", "INFO"], environ={}).log_level == "info"
    environ = {"EVENTBUS_LOG_LEVEL": "Critical"}
    assert load_config(["--no-auth"], environ=environ).log_level == "critical"
    with pytest.raises(ConfigError, match="log-level"):
        load_config(["--no-auth", "--log-level", "verbose"], environ={})


def test_configure_logging_takes_the_five_level_names_only():
    """The logging module also knows WARN, FATAL and NOTSET (which logs everything): a server
    given one of those from the environment started, where the docs say it is refused."""
    import pytest

    for level in ("warn", "fatal", "notset", "NOTSET", "verbose"):
        with pytest.raises(ValueError, match="log level"):
            logs.configure_logging("json", level)
