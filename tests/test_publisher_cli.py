"""``python -m publisher`` / ``eventbus-publish`` against the private redis-server.

Most cases call ``main()`` in-process (fast); the ones about the real entry points, environment
variables, stdin and exit codes of the process run it as a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from publisher import Publisher, Retention
from publisher.__main__ import main
from schemas import Keys, ProjectEvent, decode_event
from schemas.tokens import verify_token
from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
KEYS = Keys()
SECRET = "cli-test-secret-that-is-long-enough-for-hs256"


def resolved_json(project_id: int = 1, blocker_id: int = 123, **overrides: object) -> str:
    event: dict[str, object] = {
        "type": "blocker_resolved",
        "project_id": project_id,
        "blocker_id": blocker_id,
        "answer": "Use JWT for stateless API",
        "resolved_at": "2025-11-08T12:45:30Z",
    }
    event.update(overrides)
    return json.dumps(event)


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.out.splitlines()]


@pytest.fixture
def cli(redis_url: str) -> Callable[..., Result]:
    """Run ``main()`` in-process against the private Redis."""

    def run(*argv: str, stdin: str = "", url: str | None = None) -> Result:
        out, err = io.StringIO(), io.StringIO()
        code = main(
            ["--redis-url", url or redis_url, *argv],
            stdin=io.StringIO(stdin),
            stdout=out,
            stderr=err,
        )
        assert "Traceback" not in err.getvalue()
        return Result(code, out.getvalue(), err.getvalue())

    return run


def run_process(
    *argv: str, stdin: str = "", env: dict[str, str] | None = None, module: bool = True
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "publisher"] if module else []
    result = subprocess.run(
        [*command, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=60,
    )
    assert "Traceback" not in result.stderr
    return result


# --- publish ----------------------------------------------------------------------------------


def test_publish_argument_prints_the_cursor(cli, redis_client: redis.Redis) -> None:
    result = cli("publish", resolved_json())
    assert result.code == 0, result.err
    [cursor] = result.lines
    epoch = redis_client.hget(KEYS.meta(1), "epoch").decode()
    assert cursor == {"project_id": 1, "epoch": epoch, "seq": 1}
    [(_id, fields)] = redis_client.xrange(KEYS.stream(1))
    assert json.loads(fields[b"f"]) == dict(json.loads(resolved_json()), seq=1)


def test_publish_from_stdin_one_document(cli) -> None:
    pretty = json.dumps(json.loads(resolved_json()), indent=2)
    assert cli("publish", stdin=pretty).lines[0]["seq"] == 1
    assert cli("publish", "-", stdin=pretty).lines[0]["seq"] == 2


def test_publish_from_stdin_json_lines_and_arrays(cli, redis_client: redis.Redis) -> None:
    lines = "\n".join(
        resolved_json(project_id=p, blocker_id=i + 1) for i, p in enumerate([1, 2, 1])
    )
    result = cli("publish", stdin=lines + "\n\n")
    assert result.code == 0, result.err
    assert [(c["project_id"], c["seq"]) for c in result.lines] == [(1, 1), (2, 1), (1, 2)]
    array = json.dumps([json.loads(resolved_json(blocker_id=9)), json.loads(resolved_json())])
    assert [c["seq"] for c in cli("publish", stdin=array).lines] == [3, 4]
    assert redis_client.xlen(KEYS.stream(1)) == 4


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (resolved_json(project_id=0), r"invalid event: .*`\$\.project_id`"),
        (resolved_json(answer=""), r"`\$\.answer`"),
        (resolved_json(resolved_at="2025-11-08T12:45:30"), r"`\$\.resolved_at`"),
        (resolved_json() + "\n" + resolved_json(blocker_id=-1), r"invalid line 2: .*blocker_id"),
        ("[" + resolved_json() + ', {"type": "nope"}]', r"invalid event 2: .*\$\.type"),
        ("not json", r"invalid line 1: JSON is malformed"),
        # a non-UTF-8 byte as Python gives it in argv or a C locale's stdin (was a traceback)
        (resolved_json().replace("Use JWT", "\udcff"), "invalid event: the input is not valid"),
        (
            resolved_json()[:-1] + ', "answer": "no"}',
            "invalid event: the key 'answer' is given twice",
        ),
        ("[" + resolved_json()[:-1] + ', "blocker_id": 9}]', "the key 'blocker_id' is given twice"),
        (resolved_json() + "\n" + resolved_json()[:-1] + ', "answer": "no"}', "invalid line 2: "),
        # nested where Python's json gave up before msgspec (a repeated key let through) and
        # where msgspec gives up too (a RecursionError traceback)
        *(
            (resolved_json()[:-1] + ', "answer": "no", "x": ' + "[" * n + "]" * n + "}", message)
            for n, message in [
                (500, "the key 'answer' is given twice"),
                (994, "invalid event: the JSON is nested too deeply"),
                (997, "invalid event: the JSON is nested too deeply"),
                (100_000, "invalid event: the JSON is nested too deeply"),
            ]
        ),
        ("42", "expected a JSON object"),
        ("[]", "empty array"),
        ("", "empty input"),
        ("   \n", "empty input"),
    ],
)
def test_publish_rejects_invalid_input_and_publishes_nothing(
    cli, redis_client: redis.Redis, stdin: str, message: str
) -> None:
    result = cli("publish", stdin=stdin)
    assert result.code == 2
    assert result.out == ""
    assert result.err.startswith("python -m publisher: error: ")
    assert re.search(message, result.err), result.err
    assert redis_client.dbsize() == 0


def test_publish_idempotency_key(cli, redis_client: redis.Redis) -> None:
    first = cli("publish", resolved_json(), "--idempotency-key", "retry-1")
    again = cli("publish", resolved_json(), "--idempotency-key", "retry-1")
    assert first.code == again.code == 0
    assert first.lines == again.lines
    assert redis_client.xlen(KEYS.stream(1)) == 1


def test_publish_idempotency_key_used_for_another_event(cli, redis_client: redis.Redis) -> None:
    assert cli("publish", resolved_json(), "--idempotency-key", "k").code == 0
    other = cli("publish", resolved_json(answer="Other"), "--idempotency-key", "k")
    assert other.code == 1 and other.out == ""
    assert "idempotency key 'k' was already used for a different event" in other.err
    assert redis_client.xlen(KEYS.stream(1)) == 1


def test_publish_idempotency_key_errors(cli, redis_client: redis.Redis) -> None:
    two = resolved_json() + "\n" + resolved_json()
    result = cli("publish", "--idempotency-key", "k", stdin=two)
    assert result.code == 2 and "exactly one event" in result.err
    result = cli("publish", resolved_json(), "--idempotency-key", "has space")
    assert result.code == 2 and "idempotency_key" in result.err
    assert redis_client.dbsize() == 0


def test_bad_prefix_is_a_usage_error(cli) -> None:
    result = cli("publish", resolved_json(), "--prefix", "bad prefix")
    assert result.code == 2 and "prefix" in result.err


def test_custom_prefix(cli, redis_client: redis.Redis) -> None:
    assert cli("publish", resolved_json(), "--prefix", "tenant-a").code == 0
    assert redis_client.exists("tenant-a:{1}:stream") == 1
    result = cli("history", "1", "--prefix", "tenant-a")
    assert result.lines[0]["seq"] == 1


# --- history ----------------------------------------------------------------------------------


def test_history_prints_cursor_and_frames(cli, redis_url: str) -> None:
    with Publisher.from_url(redis_url) as pub:
        cursors = pub.publish_many(_events(blocker_ids=range(1, 6), project_id=4))
    result = cli("history", "4")
    assert result.code == 0, result.err
    header, *frames = result.lines
    assert header == {
        "project_id": 4,
        "epoch": cursors[0].epoch,
        "seq": 5,
        "oldest": 1,
        "after": 0,
        "count": 5,
        "more": False,
        "trimmed": False,
    }
    assert [f["seq"] for f in frames] == [1, 2, 3, 4, 5]
    assert [f["blocker_id"] for f in frames] == [1, 2, 3, 4, 5]
    page = cli("history", "4", "--after", "2", "--limit", "2")
    header, *frames = page.lines
    assert [f["seq"] for f in frames] == [3, 4]
    assert (header["count"], header["more"]) == (2, True)
    last = cli("history", "4", "--after", "4", "--limit", "2").lines
    assert ([f["seq"] for f in last[1:]], last[0]["more"]) == ([5], False)
    assert cli("history", "4", "--after", "5").lines[0]["count"] == 0


def test_history_of_unknown_project_is_empty_and_read_only(cli, redis_client: redis.Redis) -> None:
    result = cli("history", "77")
    assert result.code == 0
    assert result.lines == [
        {
            "project_id": 77,
            "epoch": None,
            "seq": 0,
            "oldest": None,
            "after": 0,
            "count": 0,
            "more": False,
            "trimmed": False,
        }
    ]
    assert redis_client.dbsize() == 0  # no epoch created by looking


def test_history_reports_trimmed_cursors(cli, redis_url: str) -> None:
    retention = Retention(max_len=10, max_age=timedelta(0))
    with Publisher.from_url(redis_url, retention=retention) as pub:
        pub.publish_many(_events(blocker_ids=range(1, 401), project_id=1))
    header = cli("history", "1", "--limit", "1").lines[0]
    assert header["oldest"] > 1 and header["trimmed"] is True
    fresh = cli("history", "1", "--after", str(header["oldest"] - 1)).lines[0]
    assert fresh["trimmed"] is False and fresh["count"] == 400 - header["oldest"] + 1


@pytest.mark.parametrize(
    "argv",
    [
        ["history", "0"],
        ["history", "-3"],
        ["history", "abc"],
        ["history", "1", "--after", "-1"],
        ["history", "1", "--limit", "0"],
        ["history", "1", "--limit", "10001"],
        ["history"],
        [],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err


# --- token ------------------------------------------------------------------------------------


def test_token(cli) -> None:
    result = cli(
        "token", "--secret", SECRET, "--project", "1", "--project", "2", "--ttl", "60",
        "--subject", "user-7",
    )  # fmt: skip
    assert result.code == 0, result.err
    claims = verify_token(result.out.strip(), SECRET)
    assert claims.projects == frozenset({1, 2})
    assert claims.sub == "user-7"
    assert result.err == ""


def test_token_all_projects_and_env_secret(cli, monkeypatch) -> None:
    monkeypatch.setenv("EVENTBUS_AUTH_SECRET", SECRET)
    result = cli("token", "--all-projects")
    assert result.code == 0, result.err
    assert verify_token(result.out.strip(), SECRET).projects == "*"


def test_token_short_secret_warns_cleanly(cli) -> None:
    result = cli("token", "--secret", "short", "--project", "1")
    assert result.code == 0
    assert result.err.startswith("python -m publisher: warning: ")


@pytest.mark.parametrize(
    "argv",
    [
        ["token", "--secret", SECRET],
        ["token", "--secret", SECRET, "--project", "0"],
        ["token", "--secret", SECRET, "--project", "x"],
        ["token", "--secret", SECRET, "--project", "1", "--all-projects"],
        ["token", "--secret", SECRET, "--project", "1", "--ttl", "0"],
        ["token", "--secret", SECRET, "--project", "1", "--ttl", "soon"],
    ],
)
def test_token_usage_errors(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_token_without_secret(cli, monkeypatch) -> None:
    monkeypatch.delenv("EVENTBUS_AUTH_SECRET", raising=False)
    result = cli("token", "--project", "1")
    assert result.code == 2 and "secret is required" in result.err


def test_token_with_a_secret_that_cannot_be_an_hmac_key_is_an_error_not_a_traceback(
    cli,
) -> None:
    """An SSH or PEM public key pasted as the secret: PyJWT's InvalidKeyError went through as
    a traceback (exit 1); it is a usage error naming the problem."""
    result = cli("token", "--project", "1", "--secret", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI")
    assert result.code == 2 and result.out == ""
    assert "the secret cannot sign tokens" in result.err and "Traceback" not in result.err


# --- Redis unavailable ------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["publish", resolved_json()], ["history", "1"]])
def test_redis_unavailable_exits_3(cli, argv: list[str]) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = cli(*argv, url=url)
    assert result.code == 3
    assert "Redis unavailable" in result.err
    assert "hunter2" not in result.err  # never print the password
    assert result.out == ""


# --- as a process -----------------------------------------------------------------------------


def test_module_entry_point_end_to_end(redis_url: str, redis_client: redis.Redis) -> None:
    published = run_process("publish", "--redis-url", redis_url, stdin=resolved_json())
    assert published.returncode == 0, published.stderr
    cursor = json.loads(published.stdout)
    history = run_process("--redis-url", redis_url, "history", "1")
    assert history.returncode == 0, history.stderr
    header, frame = (json.loads(line) for line in history.stdout.splitlines())
    assert (header["epoch"], header["seq"]) == (cursor["epoch"], cursor["seq"])
    assert frame == dict(json.loads(resolved_json()), seq=1)


def test_environment_variables(redis_url: str, redis_client: redis.Redis) -> None:
    env = {"EVENTBUS_REDIS_URL": redis_url, "EVENTBUS_PREFIX": "from-env"}
    result = run_process("publish", resolved_json(), env=env)
    assert result.returncode == 0, result.stderr
    assert redis_client.exists("from-env:{1}:stream") == 1


def test_process_exit_codes(redis_url: str) -> None:
    invalid = run_process("publish", "--redis-url", redis_url, resolved_json(answer=""))
    assert invalid.returncode == 2
    assert "`$.answer`" in invalid.stderr
    down = run_process(
        "history", "1", env={"EVENTBUS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    )
    assert down.returncode == 3 and "Redis unavailable" in down.stderr
    usage = run_process("history", "zero")
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_console_script(redis_url: str) -> None:
    script = Path(sys.executable).parent / "eventbus-publish"
    if not script.exists():
        script_path = shutil.which("eventbus-publish")
        if script_path is None:
            pytest.skip("eventbus-publish is not installed (pip install -e .)")
        script = Path(script_path)
    result = run_process(str(script), "token", "--secret", SECRET, "--project", "3", module=False)
    assert result.returncode == 0, result.stderr
    assert verify_token(result.stdout.strip(), SECRET).projects == frozenset({3})
    # --help names the command the user typed, not the module.
    usage = run_process(str(script), "--help", module=False)
    assert usage.stdout.startswith("usage: eventbus-publish "), usage.stdout
    assert run_process("--help").stdout.startswith("usage: python -m publisher ")


def _events(*, blocker_ids: range, project_id: int) -> list[ProjectEvent]:
    return [decode_event(resolved_json(project_id=project_id, blocker_id=i)) for i in blocker_ids]


def test_history_into_a_closed_pipe_exits_quietly(redis_url: str) -> None:
    with Publisher.from_url(redis_url) as pub:  # ~3 MB of frames: more than a pipe buffers
        events = _events(blocker_ids=range(1, 5001), project_id=1)
        for event in events:
            event.answer = "x" * 500
        pub.publish_many(events)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "publisher",
            "--redis-url",
            redis_url,
            "history",
            "1",
            "--limit",
            "5000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None and process.stderr is not None
    assert json.loads(process.stdout.readline())["seq"] == 5000
    process.stdout.close()  # like `| head -1`
    stderr = process.stderr.read().decode()
    assert process.wait(30) == 0
    assert stderr == ""


def test_redis_cluster_url() -> None:
    from tests.support.redis_cluster import RedisCluster

    with RedisCluster(masters=3, replicas=0) as cluster:
        out, err = io.StringIO(), io.StringIO()
        argv = ["--redis-url", cluster.url]
        assert main([*argv, "publish", resolved_json(project_id=42)], stdout=out, stderr=err) == 0
        cursor = json.loads(out.getvalue())
        out = io.StringIO()
        assert main([*argv, "history", "42"], stdout=out, stderr=err) == 0, err.getvalue()
        header, frame = (json.loads(line) for line in out.getvalue().splitlines())
        assert (header["epoch"], header["seq"]) == (cursor["epoch"], 1)
        assert frame["seq"] == 1 and frame["project_id"] == 42


def test_tail_relay_and_http_api_are_reached_through_the_cli() -> None:
    from publisher.__main__ import PROG

    for command in ("tail", "relay", "http-api"):
        usage = f"usage: {PROG} {command} "
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0 and out.getvalue().startswith(usage), out.getvalue()[:200]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["http-api", "new-key", "--id", "svc", "--projects", "3"]) == 0
    assert out.getvalue().startswith("key (shown once")


async def test_publisher_and_cli_read_presence_as_the_gateways_store_it(redis_url) -> None:
    import redis.asyncio

    from gateway.presence import PresenceCore
    from gateway.presence_store import PresenceStore
    from publisher import AsyncPublisher

    client = redis.asyncio.Redis.from_url(redis_url)
    core = PresenceCore("pod1", clock_ms=iter(range(1, 10**6)).__next__)
    store = PresenceStore(client, "pod1", ttl=30, publish_command="PUBLISH")
    core.join("tab-a", 5, "alice", "Alice")
    core.join("tab-b", 5, "bob", None)
    core.activity("tab-a", 5, 12, 12)
    for write, ok in zip(writes := core.take_writes(), await store.write(writes), strict=True):
        core.written(write, ok)
    await client.aclose()

    with Publisher.from_url(redis_url) as pub:
        assert [(m.id, m.name, m.answering) for m in pub.presence(5)] == [
            ("alice", "Alice", 12),
            ("bob", None, None),
        ]
        assert pub.presence(6) == []
        with pytest.raises(ValueError):
            pub.presence(0)
    async with AsyncPublisher.from_url(redis_url) as apub:
        assert [m.id for m in await apub.presence(5)] == ["alice", "bob"]
    out = run_process("--redis-url", redis_url, "presence", "5")
    assert out.stdout.splitlines() == ["alice (Alice): viewing 12, answering 12", "bob: online"]
    members = json.loads(run_process("--redis-url", redis_url, "presence", "5", "--json").stdout)
    assert [m["id"] for m in members] == ["alice", "bob"]


async def test_publisher_and_cli_read_a_pod_of_a_deployment_with_a_higher_member_cap(
    redis_url,
) -> None:
    """With --presence-max-members 2,500 a pod lists 2,100 members, more than a read with the
    default cap takes (2 x 1,000 + 64): given the setting, Publisher, AsyncPublisher and the CLI
    list them all (with the default the pod was left out whole: no member listed)."""
    import redis.asyncio

    from gateway.presence import PresenceCore
    from gateway.presence_store import PresenceStore
    from publisher import AsyncPublisher

    project = 424_242
    client = redis.asyncio.Redis.from_url(redis_url)
    core = PresenceCore("pod1", clock_ms=iter(range(1, 10**6)).__next__)
    store = PresenceStore(client, "pod1", ttl=30, publish_command="PUBLISH")
    members = sorted(f"m{i:04}" for i in range(2_100))
    for i, member in enumerate(members):
        core.join(f"tab-{i}", project, member, None)
    for write, ok in zip(writes := core.take_writes(), await store.write(writes), strict=True):
        core.written(write, ok)
    try:
        with Publisher.from_url(redis_url) as pub:
            assert [m.id for m in pub.presence(project, max_members=2_500)] == members
            with pytest.raises(ValueError):
                pub.presence(project, max_members=0)
        async with AsyncPublisher.from_url(redis_url) as apub:
            listed = await apub.presence(project, max_members=2_500)
            assert [m.id for m in listed] == members
        args = ("--redis-url", redis_url, "presence", str(project), "--json")
        out = run_process(*args, "--presence-max-members", "2500")
        assert [m["id"] for m in json.loads(out.stdout)] == members
    finally:
        keys = Keys()
        await client.delete(
            keys.presence_pods(project),
            keys.presence_versions(project),
            keys.presence_pod(project, "pod1"),
        )
        await client.aclose()
