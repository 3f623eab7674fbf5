"""The samples of docs/consumer.md, outbox.md, events.md and publisher.md, run as written
against real processes: a gateway, Redis and PostgreSQL (browser.md's page: tests/browser/
test_quick_start_page.py).

A sample is taken from the page verbatim; the test only replaces what the page says is the
reader's own (the gateway's URL, the database's address, ``SECRET`` and the application's
functions ``page_someone`` and ``reload_pending_blockers``), so a sample that drifts from the API
(a renamed argument, a field that does not exist, a store that needs a table first) fails here
before a reader meets it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from publisher import Publisher
from tests.support.doc_samples import DOCS, code_block, contract_blocker, shell_line
from tests.support.gateway_process import GatewayProcess, parse_metrics

ROOT = Path(__file__).resolve().parents[1]
SECRET = "doc-sample-secret-" + "s" * 32
#: A line of structlog's default console output: the consumer logs there (stdout) unless the
#: application configures structlog, as consumer.md asks; the samples configure nothing.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


def python_block(doc: str, marker: str) -> str:
    return code_block(doc, "python", marker)


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the sample no longer has exactly one {old!r}"
    return text.replace(old, new)


class Script:
    """A sample run as a Python program in ``cwd``; its stdout read line by line."""

    def __init__(self, code: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.path = cwd / "sample.py"
        self.path.write_text(code)
        self.cwd = cwd
        self.env = env or {}
        self.process: subprocess.Popen[str] | None = None
        self.stderr = cwd / "sample.stderr"

    def start(self) -> Script:
        with self.stderr.open("w") as stderr:  # (the child writes to its own copy)
            self.process = subprocess.Popen(
                [sys.executable, str(self.path)],
                cwd=self.cwd,
                env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **self.env},
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        return self

    def lines(self, count: int, timeout: float = 30.0) -> list[str]:
        """The next ``count`` lines it prints, log lines aside (fails, with its stderr, if it
        exits first)."""
        assert self.process is not None and self.process.stdout is not None
        stdout = self.process.stdout
        lines: list[str] = []

        def read() -> None:
            while len(lines) < count and (line := stdout.readline()):
                if not LOG_LINE.match(line):
                    lines.append(line.rstrip("\n"))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        assert len(lines) == count, (
            f"the sample printed {lines} (exit code {self.process.poll()}); "
            f"stderr: {self.stderr.read_text()[-3000:]}"
        )
        return lines

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved on the way out."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.communicate(timeout=10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


def async_program(fragment: str, imports: str, names: str) -> str:
    """A program around a page's fragment (``async with`` at its top level): the reader's
    ``imports`` and ``names``, then the fragment inside ``async def main()``, run."""
    return (
        f"import asyncio\n\n{imports}\n\n{names}\n\n"
        f"async def main() -> None:\n{textwrap.indent(fragment, '    ')}\n\nasyncio.run(main())\n"
    )


def wait_for_subscriptions(gateway: GatewayProcess, count: int, timeout: float = 30.0) -> None:
    """Until the gateway holds ``count`` subscriptions (the sample starts live: what is
    published before its subscribe is not for it)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = gateway.get("/metrics")
        if status == 200 and parse_metrics(body.decode()).get("eventbus_subscriptions") == count:
            return
        assert time.monotonic() < deadline, f"never {count} subscriptions: {body.decode()}"
        time.sleep(0.05)


@pytest.fixture
def gateway(redis_url: str) -> Iterator[GatewayProcess]:
    with GatewayProcess(redis_url, auth_secret=SECRET) as process:
        yield process


def test_consumer_quick_start_runs_as_written_and_resumes_from_its_file(
    gateway: GatewayProcess, bus: Publisher, tmp_path: Path
) -> None:
    """consumer.md's first sample: pages for a SYNC blocker only, prints each answer, and,
    killed and started again, goes on from the cursor its file store saved: the event published
    while it was down comes, nothing before it again."""
    sample = python_block("consumer.md", "FileCursorStore(")
    sample = replace_once(sample, '"ws://gateway:8765/"', repr(gateway.ws_url))
    application = f"""\
SECRET = {SECRET!r}


async def page_someone(blocker):
    print("paged", blocker.id)


async def reload_pending_blockers():
    print("reload")


"""
    # The sample's own imports come first in the file, the application's names before main().
    head, _, rest = sample.partition("\ndef token()")
    script = Script(head + "\n" + application + "def token()" + rest, tmp_path)
    try:
        script.start()
        wait_for_subscriptions(gateway, 1)
        bus.blocker_created(1, contract_blocker(123, "SYNC"))
        bus.blocker_created(1, contract_blocker(124, "ASYNC"))
        bus.blocker_resolved(1, 123, "Use JWT")
        assert script.lines(2) == ["paged 123", "3 123 Use JWT"]
        # The cursor of an item is saved when the next one is asked for: the loop asks at once.
        cursors = tmp_path / "notifier-cursors.json"
        deadline = time.monotonic() + 10
        while not (cursors.exists() and json.loads(cursors.read_text())["1"][1] == 3):
            assert time.monotonic() < deadline, "the cursor of item 3 was never saved"
            time.sleep(0.02)
        script.kill()
        wait_for_subscriptions(gateway, 0)
        bus.blocker_resolved(1, 124, "Sessions")
        script.start()
        assert script.lines(1) == ["4 124 Sessions"]
        bus.blocker_resolved(1, 125, "Later")
        assert script.lines(1) == ["5 125 Later"]
    finally:
        script.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    from tests.support.outbox_db import private_database

    with private_database("_doc_samples") as url:
        yield url


def test_consumer_exactly_once_sample_runs_as_written_on_postgresql(
    gateway: GatewayProcess, bus: Publisher, postgres_url: str, tmp_path: Path
) -> None:
    """consumer.md's "exactly-once across crashes" sample (psycopg): each event in the audit
    table once, in order, across a SIGKILL, the cursor saved with it in one transaction."""
    import psycopg

    with psycopg.connect(postgres_url) as db:
        db.execute("CREATE TABLE audit (project_id INT, seq INT, body TEXT)")
    sample = python_block("consumer.md", 'SqlCursorStore(db, "audit-logger")')
    # The page's fragment needs the reader's DSN, url and token, and an async function to run in.
    script = Script(
        async_program(
            sample,
            "import psycopg\n\nfrom consumer import Consumer, Delivery, SqlCursorStore\n"
            "from publisher import issue_token",
            f"DSN = {postgres_url!r}\nurl = {gateway.ws_url!r}\n\n\n"
            f"def token() -> str:\n    return issue_token({SECRET!r}, projects=[1])",
        ),
        tmp_path,
    )

    def audited() -> list[int]:
        with psycopg.connect(postgres_url) as db:
            return [row[0] for row in db.execute("SELECT seq FROM audit ORDER BY seq")]

    def wait_for_audited(count: int) -> list[int]:
        deadline = time.monotonic() + 30
        while len(seqs := audited()) < count:
            assert time.monotonic() < deadline, f"audited {seqs}: {script.stderr.read_text()}"
            time.sleep(0.05)
        return seqs

    try:
        script.start()
        wait_for_subscriptions(gateway, 1)
        for blocker_id in (1, 2, 3):
            bus.blocker_resolved(1, blocker_id, "yes")
        assert wait_for_audited(3) == [1, 2, 3]
        script.kill()
        wait_for_subscriptions(gateway, 0)
        for blocker_id in (4, 5):
            bus.blocker_resolved(1, blocker_id, "yes")
        script.start()
        assert wait_for_audited(5) == [1, 2, 3, 4, 5]
        with psycopg.connect(postgres_url) as db:
            bodies = [json.loads(row[0]) for row in db.execute("SELECT body FROM audit")]
        assert sorted(body["blocker_id"] for body in bodies) == [1, 2, 3, 4, 5]
    finally:
        script.close()


def python_command(line: str, **replace: str) -> list[str]:
    """A documented ``python -m ...`` line as this interpreter's argument list, with the
    reader's own values replaced."""
    for old, new in replace.items():
        line = replace_once(line, old, new)
    words = line.split()
    assert words[0] == "python"
    return [sys.executable, *words[1:]]


def outbox_events(redis_url: str) -> list[tuple[int, int, str]]:
    """(seq, blocker_id, answer) of project 1's events in Redis."""
    import redis

    from schemas import Keys, decode_event

    client = redis.Redis.from_url(redis_url)
    try:
        entries = client.xrange(Keys().stream(1))
    finally:
        client.close()
    events = []
    for entry_id, fields in entries:
        frame = fields[b"f"]
        event = decode_event(frame[: frame.rindex(b',"seq":')] + b"}")
        events.append((int(entry_id.split(b"-")[0]), event.blocker_id, event.answer))
    return events


def test_outbox_quick_start_runs_as_written_on_postgresql(
    redis_url: str, postgres_url: str, tmp_path: Path
) -> None:
    """outbox.md's PostgreSQL path: `migrate --dsn`, the psycopg sample's transaction, then
    `relay --dsn ... --redis-url ...` publishes its event; SIGTERM ends the relay with 0."""
    import psycopg

    from tests.support.outbox_db import wait_until

    reader = {"postgresql://app@db/app": postgres_url}
    migrate = python_command(shell_line("outbox.md", "migrate --dsn"), **reader)
    done = subprocess.run(migrate, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(postgres_url) as db:  # the application's own table
        db.execute("CREATE TABLE blockers (id INT PRIMARY KEY, status TEXT, answer TEXT)")
        db.execute("INSERT INTO blockers VALUES (123, 'PENDING', NULL)")
    sample = python_block("outbox.md", 'psycopg.connect("postgresql://app@localhost/app")')
    sample = replace_once(sample, '"postgresql://app@localhost/app"', repr(postgres_url))
    script = Script(sample, tmp_path).start()
    assert script.process is not None and script.process.wait(60) == 0, script.stderr.read_text()
    relay_line = shell_line("outbox.md", "relay --dsn")
    relay = subprocess.Popen(
        python_command(relay_line, **reader, **{"redis://redis:6379/0": redis_url}),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: outbox_events(redis_url), timeout=30) == [(1, 123, "Use JWT")]
    finally:
        relay.send_signal(signal.SIGTERM)
        _, stderr = relay.communicate(timeout=30)
    assert relay.returncode == 0, stderr
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT status, answer FROM blockers").fetchall() == [
            ("RESOLVED", "Use JWT")
        ]


def test_outbox_sqlite_sample_runs_as_written_with_an_in_process_relay(
    redis_url: str, tmp_path: Path
) -> None:
    """outbox.md's SQLite path: `migrate --sqlite`, then the SQLite sample beside the page's
    in-process relay (`OutboxRelay.sqlite(path, ...)`): its event reaches Redis once."""
    import sqlite3

    database = tmp_path / "app.db"
    migrate = python_command(
        shell_line("outbox.md", "migrate --sqlite"), **{"/var/lib/app/app.db": str(database)}
    )
    done = subprocess.run(migrate, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(database) as db:  # the application's own table
        db.execute("CREATE TABLE blockers (id INT PRIMARY KEY, status TEXT)")
        db.execute("INSERT INTO blockers VALUES (123, 'PENDING')")
    db.close()
    imports = python_block("outbox.md", "import psycopg\n").split("\n\n")[0]
    relay = python_block("outbox.md", "OutboxRelay.postgres(dsn")
    relay = replace_once(relay, "OutboxRelay.postgres(dsn,", "OutboxRelay.sqlite(path,")
    relay = relay.replace("...\n", "")
    sample = python_block("outbox.md", 'sqlite3.connect("app.db")')
    # The page's fragments in the order a program has them: imports, the outbox, the relay
    # started, the SQLite write, then the relay stopped once the event is out.
    code = f"""\
{imports.replace("import psycopg", "")}
import time

import redis as redis_py

from schemas import Keys

path = {str(database)!r}
redis_url = {redis_url!r}
outbox = Outbox()
{relay.split("relay.stop()")[0]}
{sample}
stream = redis_py.Redis.from_url(redis_url)
deadline = time.monotonic() + 30
while not stream.xlen(Keys().stream(1)) and time.monotonic() < deadline:
    time.sleep(0.01)
{"relay.stop()" + relay.split("relay.stop()")[1]}
"""
    script = Script(code, tmp_path).start()
    assert script.process is not None and script.process.wait(60) == 0, script.stderr.read_text()
    assert outbox_events(redis_url) == [(1, 123, "Use JWT")]
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT status FROM blockers").fetchall() == [("RESOLVED",)]
    db.close()


def json_block_after(doc: str, marker: str) -> str:
    """The first ```json block of ``docs/<doc>`` after ``marker``."""
    text = (DOCS / doc).read_text()
    return text[text.index(marker) :].split("```json\n", 1)[1].split("```", 1)[0].strip()


def test_adding_an_event_type_works_as_events_md_says(redis_url: str, tmp_path: Path) -> None:
    """events.md's worked example: the Struct pasted into schemas/events.py above
    event_types() (in a copy of the package), the page's publish call, and what Redis stores is
    the page's JSON, field for field and in its order (the timestamp and seq are the run's)."""
    import shutil

    shutil.copytree(ROOT / "schemas", tmp_path / "schemas")
    events_py = tmp_path / "schemas" / "events.py"
    struct = python_block("events.md", "class TaskStatusChanged(")
    source = events_py.read_text()
    anchor = "\ndef event_types("
    assert source.count(anchor) == 1
    events_py.write_text(source.replace(anchor, "\n" + struct + "\n" + anchor))
    publish = python_block("events.md", "bus.publish(TaskStatusChanged(")
    script = tmp_path / "publish.py"
    script.write_text(
        f"from publisher import Publisher\n\nbus = Publisher.from_url({redis_url!r})\n{publish}"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    import redis

    from schemas import Keys

    client = redis.Redis.from_url(redis_url)
    try:
        [(_, fields)] = client.xrange(Keys().stream(1))
    finally:
        client.close()
    stored = json.loads(fields[b"f"])
    documented = json.loads(json_block_after("events.md", "bus.publish(TaskStatusChanged("))
    assert list(stored) == list(documented)
    run_values = {"changed_at", "seq"}
    assert {k: v for k, v in stored.items() if k not in run_values} == {
        k: v for k, v in documented.items() if k not in run_values
    }
    assert stored["seq"] == 1 and stored["changed_at"].endswith("Z")


def test_consumer_presence_sample_runs_as_written(gateway: GatewayProcess, tmp_path: Path) -> None:
    """consumer.md's presence sample (a fragment: the reader's url, token and blocker_id, and an
    async function around it): a person's tab arriving, then leaving, as the sample prints it."""
    sample = python_block("consumer.md", "bus.presence(1)")
    watcher = Script(
        async_program(
            sample,
            "from consumer import Consumer\nfrom publisher import issue_token",
            f"url = {gateway.ws_url!r}\nblocker_id = 123\n\n\n"
            f"def token() -> str:\n    return issue_token({SECRET!r}, projects=[1])",
        ),
        tmp_path,
    )
    person_dir = tmp_path / "person"
    person_dir.mkdir()
    # A person's connection (a token with a subject): what a dashboard tab is to presence.
    person = Script(
        f"""\
import asyncio

from consumer import Consumer
from publisher import issue_token

token = issue_token({SECRET!r}, projects=[1], subject="user-7", name="Alice")


async def main() -> None:
    async with Consumer({gateway.ws_url!r}, token=token) as bus:
        async for item in bus.events(1):
            pass

asyncio.run(main())
""",
        person_dir,
    )
    try:
        watcher.start()
        assert watcher.lines(1) == ["left ()"]  # the first view: nobody there
        person.start()
        assert watcher.lines(2) == ["arrived user-7 Alice", "left ()"]
        person.kill()
        assert watcher.lines(1) == ["left ('user-7',)"]
    finally:
        person.close()
        watcher.close()


def test_publisher_idempotency_and_revocation_samples_run_as_written(
    redis_url: str, tmp_path: Path
) -> None:
    """publisher.md's idempotent retry (its own assert holds) and its revocation calls."""
    retry = python_block("publisher.md", 'idempotency_key="blocker-123-resolved"')
    revoke = python_block("publisher.md", 'bus.revoke_tokens("user-7")')
    revoke = replace_once(revoke, '"redis://localhost:6379/0"', repr(redis_url))
    script = Script(revoke + "\n" + retry + '\nprint("retried", again.seq)\n', tmp_path).start()
    assert script.process is not None and script.process.wait(60) == 0, script.stderr.read_text()
    issued_before, expires_at = map(int, script.lines(1)[0].split())
    assert expires_at > issued_before > time.time() - 60
    assert script.lines(1) == ["retried 1"]


def stream_types(redis_url: str) -> list[str]:
    """The types of project 1's events in Redis, in order."""
    import redis

    from schemas import Keys

    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(fields[b"f"])["type"] for _, fields in client.xrange(Keys().stream(1))]
    finally:
        client.close()


@pytest.mark.parametrize(
    ("marker", "published"),
    [
        (
            "from publisher import Publisher\nfrom schemas import Blocker, utc_now",
            ["blocker_created", "blocker_resolved", "agent_resumed", "blocker_expired"],
        ),
        ("from publisher import AsyncPublisher", ["blocker_resolved"]),
    ],
)
def test_publisher_quick_start_samples_run_as_written(
    marker: str, published: list[str], redis_url: str, tmp_path: Path
) -> None:
    """publisher.md's first two samples, pasted into a file, publish (only the URL is the
    test's)."""
    sample = replace_once(
        python_block("publisher.md", marker), '"redis://localhost:6379/0"', repr(redis_url)
    )
    script = Script(sample, tmp_path).start()
    assert script.process is not None and script.process.wait(60) == 0, script.stderr.read_text()
    assert stream_types(redis_url) == published


def test_publisher_token_sample_runs_as_written(tmp_path: Path) -> None:
    """publisher.md's token sample, with the secret in the environment as the page says."""
    sample = python_block("publisher.md", "issue_token(SECRET")
    script = Script(sample, tmp_path, {"EVENTBUS_AUTH_SECRET": "s" * 32}).start()
    assert script.process is not None and script.process.wait(60) == 0, script.stderr.read_text()
