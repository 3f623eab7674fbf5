"""Prometheus metrics in the text exposition format, without a client library.

The gateway's counters are plain attributes bumped on hot paths (an integer add); rendering
happens only when ``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

from schemas.stored import ForeignKind

__all__ = ["Metrics"]


class Histogram:
    """A cumulative histogram with fixed buckets (seconds)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = sorted(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def render(self, name: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.sum:.6f}")
        lines.append(f"{name}_count {self.count}")
        return lines


class Metrics:
    """Every metric the gateway exports. Gauges are read from live state at scrape time."""

    COUNTERS = {
        "connections_accepted_total": "WebSocket connections accepted.",
        "connections_rejected_total": (
            "Handshakes, streams and polls refused (origin, limits, draining)."
        ),
        "connections_dropped_total": (
            "Sockets closed at accept, unanswered: --max-connections plus the slack were open."
        ),
        "events_in_total": "Events received from Redis pub/sub.",
        "deliveries_total": "Event frames written to subscribers (live and replayed).",
        "replayed_total": "Events replayed from history on subscribe or poll.",
        "resyncs_total": "resync_required messages sent.",
        "slow_consumer_disconnects_total": "Connections closed for not reading fast enough.",
        "pubsub_reconnects_total": "Times the Redis pub/sub link was re-established.",
        "pubsub_probe_failures_total": "Pub/sub probes that got no answer in time.",
        "gaps_repaired_total": "Missing live events filled from the stream.",
        "malformed_messages_total": "Garbage or foreign messages on an event channel, skipped.",
        "client_errors_total": "error messages for bad input; streams and polls refused 403.",
        "auth_failures_total": "Connections closed or streams and polls refused 401: bad token.",
        "polls_total": "HTTP polling requests answered.",
        "poll_reads_total": "History reads made for polls (shared by concurrent ones at a cursor).",
        "bad_requests_total": (
            "HTTP requests and handshakes refused as malformed (400, 426) or too large (414, 431)."
        ),
        "resumes_from_memory_total": "Subscribes answered from a feed's resume window (no read).",
        "subscribe_reads_total": "History reads made for subscribes (shared by concurrent ones).",
        "window_fills_total": "History reads merged into a feed's resume window.",
        "presence_diffs_total": "presence_diff messages built (one per project per interval).",
        "presence_deliveries_total": "presence_diff frames queued to connections.",
        "presence_unannounced_writes_total": (
            "Presence writes announced without their records (over "
            "--presence-max-announcement): each costs every pod watching the project a read."
        ),
        "presence_unlisted_total": (
            "Subscribes not listed in presence because the project had --presence-max-members "
            "or the token's sub was over 255 characters."
        ),
        "protocol_violations_total": (
            "Connections closed for breaking the WebSocket protocol (1002, 1007, 1009)."
        ),
        "client_frames_rate_limited_total": (
            "Client frames refused with error rate_limited (over --client-rate / --client-burst)."
        ),
        "rate_limit_disconnects_total": (
            "Connections closed with 4029 for sending on while their frames were refused."
        ),
        "revoked_tokens_refused_total": (
            "Tokens refused as revoked (auth, refresh, handshake, stream, poll)."
        ),
        "revocations_unknown_refusals_total": (
            "Valid tokens refused (1013, 503) because the revocation list was not read yet."
        ),
        "revocation_disconnects_total": (
            "Open connections closed with 4003 because their token was revoked."
        ),
        "revocation_poll_failures_total": (
            "Polls of the revocation list Redis did not answer in time (the last list stays)."
        ),
    }

    def __init__(self) -> None:
        for name in self.COUNTERS:
            setattr(self, name, 0)
        #: Values read from Redis that the event bus cannot have written, skipped, by kind.
        self.foreign_values: dict[str, int] = {kind.value: 0 for kind in ForeignKind}
        self.relay_lag = Histogram([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5])
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> bytes:
        lines: list[str] = []
        for name, help_text in self.COUNTERS.items():
            full = f"eventbus_{name}"
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} counter"]
            lines.append(f"{full} {getattr(self, name)}")
        name = "eventbus_foreign_values_total"
        lines += [
            f"# HELP {name} Values read from Redis that the event bus cannot have written, "
            "skipped (see docs/operations.md, 'A writer to Redis').",
            f"# TYPE {name} counter",
        ]
        lines += [f'{name}{{kind="{kind}"}} {n}' for kind, n in self.foreign_values.items()]
        for name, (help_text, read) in self.gauges.items():
            full = f"eventbus_{name}"
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} gauge", f"{full} {read()}"]
        name = "eventbus_relay_lag_seconds"
        lines += [
            f"# HELP {name} Time from the publish (Redis clock) to the write to subscribers.",
            f"# TYPE {name} histogram",
            *self.relay_lag.render(name),
        ]
        return ("\n".join(lines) + "\n").encode()
