"""SSE clients for tests: a raw stream reader, and a resuming client for fault tests.

* :func:`open_stream`: sends ``GET`` with the given headers on a plain socket, returns the
  status, the response headers and a :class:`Stream` that parses what follows
  (:class:`gateway.sse.SseParser`).
* :class:`ResumingSseClient`: :class:`tests.support.ws_client.ResumingClient` over SSE: it
  reconnects whenever its stream ends and resumes with the ``Last-Event-ID`` the gateway gave
  it (the ``id`` of the last event), exactly as a browser's client does; it records what it
  gets in the same :class:`Received` log, so :func:`check_delivery` judges it the same way. It
  also checks that every ``id`` is the cursor of what it just received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import urlsplit

from gateway.sse import SseEvent, SseParser
from schemas.tags import event_tag
from tests.support.ws_client import Cursor, ResumingClient

__all__ = ["ResumingSseClient", "Stream", "open_stream", "stream_path"]


def stream_path(projects: Sequence[int]) -> str:
    if len(projects) == 1:
        return f"/v1/projects/{projects[0]}/stream"
    return "/v1/stream?" + "&".join(f"project={p}" for p in projects)


class Stream:
    """An open SSE response: :meth:`next` returns its events one by one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rest: bytes):
        self.reader = reader
        self.writer = writer
        self.parser = SseParser()
        self.pending: list[SseEvent] = self.parser.feed(rest)
        self.ended = False

    async def next(self, within: float = 5.0) -> SseEvent | None:
        """The next event; None once the stream has ended."""
        async with asyncio.timeout(within):
            while not self.pending:
                if self.ended:
                    return None
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionError:
                    chunk = b""
                if not chunk:
                    self.ended = True
                    return None
                self.pending.extend(self.parser.feed(chunk))
        return self.pending.pop(0)

    async def until(self, event: str, within: float = 5.0) -> list[SseEvent]:
        """Events up to and including the first named ``event``."""
        seen = []
        while True:
            item = await self.next(within)
            if item is None:
                raise AssertionError(f"the stream ended before {event!r}: {seen}")
            seen.append(item)
            if item.event == event:
                return seen

    async def rest(self, within: float = 5.0) -> list[SseEvent]:
        """Every event until the stream ends."""
        out = []
        while (item := await self.next(within)) is not None:
            out.append(item)
        return out

    def close(self) -> None:
        self.writer.close()


async def open_stream(
    base_url: str, path: str, headers: Mapping[str, str] | None = None, *, method: str = "GET"
) -> tuple[int, dict[str, str], Stream]:
    """Open ``path`` on the gateway at ``base_url`` (ws:// or http://)."""
    parts = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.hostname}:{parts.port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ")[1])
    response_headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            response_headers[name.strip().lower()] = value.strip()
    return status, response_headers, Stream(reader, writer, b"")


def untagged(event_id: str) -> str:
    """An SSE id without its events' tags (``<epoch>:<seq>`` per project)."""
    return re.sub(r":[0-9a-f]{16}(?=,|$)", "", event_id)


def _tag_right(item: SseEvent, message: dict) -> bool:
    """Whether the tag the id gives the project that ``item`` moved is the event's own (an
    event's: the tag of its text; a ``subscribed``'s or a ``resync_required``'s: its ``tag``)."""
    cursor = item.id
    if "=" in cursor:  # several projects: 1=<epoch>:<seq>:<tag>,2=...
        cursors = dict(part.split("=", 1) for part in cursor.split(","))
        cursor = cursors.get(str(message.get("project_id")), "")
    parts = cursor.split(":")
    tag = parts[2] if len(parts) == 3 else None
    if item.event == "message":
        return tag == event_tag(item.data.encode())
    return tag == message.get("tag")


class ResumingSseClient(ResumingClient):
    """A :class:`ResumingClient` reading SSE streams (see the module doc)."""

    def __init__(
        self,
        urls: Sequence[str],
        projects: Iterable[int],
        *,
        token: str | None = None,
        start: int = 0,
        name: str = "",
        cursors: Mapping[int, Cursor] | None = None,
        tags: Mapping[int, str | None] | None = None,
        retry_delay: tuple[float, float] = (0.02, 0.25),
    ) -> None:
        super().__init__(
            urls,
            projects,
            token=token,
            start=start,
            name=name,
            cursors=cursors,
            tags=tags,
            retry_delay=retry_delay,
        )
        #: What the next stream resumes from: the ``id`` of the last event received.
        self.last_event_id: str | None = None
        if cursors:  # taking over another client's cursors: its id, tags included
            self.last_event_id = self._cursor_id(tagged=True)
        self._stream: Stream | None = None

    def _cursor_id(self, tagged: bool = False) -> str:
        def one(project_id: int) -> str:
            epoch, seq = self.cursors[project_id]
            tag = self.cursor_tag(project_id) if tagged else None
            return f"{epoch}:{seq}" + (f":{tag}" if tag else "")

        if len(self.projects) == 1:
            return one(self.projects[0])
        return ",".join(f"{p}={one(p)}" for p in sorted(self.cursors))

    async def stop(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def drop(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def abort(self) -> None:
        if self._stream is not None:
            self._stream.writer.transport.abort()

    async def _session(self, url: str) -> None:
        headers = {}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        try:
            status, _, stream = await open_stream(url, stream_path(self.projects), headers)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise OSError(f"no HTTP answer: {exc!r}") from exc  # counted as a failed connect
        self._stream = stream
        close_code = None
        try:
            if status != 200:
                self.stats.handshake_failures += 1
                return
            self.url = url
            self.stats.connects += 1
            while (item := await stream.next(within=3600)) is not None:
                if item.event == "close":
                    close_code = json.loads(item.data)["code"]
                    continue
                message = json.loads(item.data)
                if item.event == "error" and message.get("code") == "unavailable":
                    self.stats.unavailable += 1  # the stream ends; we resume from its id
                    continue
                self._on_message(message, item.data)
                if item.id is not None and item.id != self.last_event_id:
                    self.last_event_id = item.id
                    if item.event in ("message", "subscribed", "resync_required"):
                        expected = self._cursor_id()
                        if untagged(item.id) != expected or not _tag_right(item, message):
                            self.stats.unexpected.append(
                                {"id": item.id, "expected": expected, "after": message}
                            )
        finally:
            self.stats.close_codes.append(close_code)
            stream.close()
            self._stream = None
