"""A peer that can vanish for real: a private network namespace joined to this one by a veth pair.

A process started in the namespace (:meth:`VethPeer.command`) reaches this one through the
pair's host end; :meth:`VethPeer.cut` sets the namespace's end down, after which nothing it
sends (not its FIN or RST, should it be killed) reaches this side, and nothing this side sends
is acknowledged: what a crashed machine or a network partition looks like to the gateway. No
iptables or qdisc needed, only ``ip`` and root.

Names are random (``ebt<6 hex>``, ``ebh…``/``ebp…`` for the two ends) and the addresses a random
``/30`` of 10/8 that no route of this machine covers, so concurrent runs do not meet. Setting up
fails loudly (``RuntimeError`` with ``ip``'s own message) rather than skipping: the fault this
reproduces is not covered otherwise.
"""

from __future__ import annotations

import random
import secrets
import subprocess

__all__ = ["VethPeer"]


def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr}")
    return done.stdout


def _free_slash30() -> tuple[str, str]:
    """Two addresses of a random 10.x.y.z/30 that nothing on this machine routes yet."""
    for _ in range(100):
        a, b, c = random.randrange(1, 255), random.randrange(256), random.randrange(0, 256, 4)
        host, peer = f"10.{a}.{b}.{c + 1}", f"10.{a}.{b}.{c + 2}"
        routes = _ip("-4", "route", "show", "match", peer).splitlines()
        if all(line.startswith("default") for line in routes):
            return host, peer
    raise RuntimeError("no free /30 in 10/8 after 100 tries")


class VethPeer:
    """A network namespace and a veth pair; a context manager that always removes both."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.namespace = f"ebt{tag}"
        self.host_link = f"ebh{tag}"
        self.peer_link = f"ebp{tag}"
        self.host_address, self.peer_address = _free_slash30()

    def __enter__(self) -> VethPeer:
        try:
            _ip("netns", "add", self.namespace)
            pair = f"{self.host_link} type veth peer name {self.peer_link} netns {self.namespace}"
            _ip("link", "add", *pair.split())
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_link)
            _ip("link", "set", self.host_link, "up")
            self.in_namespace("ip", "addr", "add", f"{self.peer_address}/30", "dev", self.peer_link)
            self.in_namespace("ip", "link", "set", self.peer_link, "up")
            self.in_namespace("ip", "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def in_namespace(self, *argv: str) -> None:
        done = subprocess.run(self.command(*argv), capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` in {self.namespace} failed: {done.stderr}")

    def cut(self) -> None:
        """The namespace's end goes down: from now on nothing crosses the pair either way."""
        self.in_namespace("ip", "link", "set", self.peer_link, "down")

    def remove(self) -> None:
        # Deleting the namespace deletes its end of the pair, which deletes the pair; the host
        # end is deleted too in case the namespace was never made.
        _ip("netns", "del", self.namespace, check=False)
        _ip("link", "del", self.host_link, check=False)
