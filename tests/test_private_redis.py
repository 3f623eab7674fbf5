"""The private ``redis-server`` and the free ports that every test which kills, hangs or flushes
Redis, and every gateway process, relies on (examples/dashboard/redis_server.py)."""

from __future__ import annotations

import pytest

from examples.dashboard import redis_server
from examples.dashboard.redis_server import PrivateRedis, free_port


def test_free_port_never_hands_out_a_recent_port_again() -> None:
    # The kernel picks among ~14,000 ports at random: 3,000 draws repeat one of the 1,024 before
    # them about 200 times, and a caller binds its port only later (a gateway after its start-up).
    ports = [free_port() for _ in range(3000)]
    assert [p for i, p in enumerate(ports) if p in ports[max(0, i - 1024) : i]] == []


def test_free_port_is_below_the_range_outgoing_connections_take_ports_from() -> None:
    """A port handed out is bound later (a gateway after its start-up): one in the ephemeral
    range could meanwhile become the local port of any outgoing connection."""
    low = redis_server._ephemeral_low()
    assert low > 3072  # (Linux's default is 32768; the test is about this machine's CI)
    ports = [free_port() for _ in range(200)]
    assert all(1024 <= port < low for port in ports)


def test_a_server_on_a_port_taken_meanwhile_is_not_taken_for_ours(monkeypatch) -> None:
    """Another server took the port between the choice and the start: its answer to PING was
    taken for the new server's, and the test went on with a Redis it did not own (flushing,
    stopping or killing it). A port given by the caller is refused; one chosen is chosen again."""
    with PrivateRedis() as theirs:
        clashing = PrivateRedis(theirs.port)
        try:
            with pytest.raises(RuntimeError, match=f"port {theirs.port} is taken"):
                clashing.start()
        finally:
            clashing.close()
        ports = iter([theirs.port, free_port()])
        monkeypatch.setattr(redis_server, "free_port", lambda host="127.0.0.1": next(ports))
        with PrivateRedis() as ours:
            assert ours.port != theirs.port
            client = ours.client()
            try:
                assert int(client.info("server")["process_id"]) == ours.process.pid
            finally:
                client.close()
        check = theirs.client()
        try:
            assert check.ping() and int(check.info("server")["process_id"]) == theirs.process.pid
        finally:
            check.close()
