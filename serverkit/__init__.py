"""Process utilities of the project's servers: the gateway and the HTTP publish API.

The neutral home of what both server processes need and neither may take from the other
(``gateway`` and ``publisher`` never import each other): it depends on the standard library and
structlog only, never on ``gateway`` or ``publisher``, as :mod:`redisconn` is for Redis clients.

* :func:`serverkit.logs.configure_logging`: JSON lines (or console columns) on stderr, the
  libraries' loggers included, and a line that cannot be written dropped, never raised
  (:mod:`serverkit.logs`; the gateway, the HTTP publish API and the outbox relay);

* :mod:`serverkit.arguments`: ``argparse`` types of the command lines (positive, finite
  seconds; a rate; whole numbers), so that a value a command cannot use is a usage error;
* :func:`raise_descriptor_limit`, :func:`warn_lowered`: a server's descriptor limit at start,
  and the warning when a bound had to be lowered to fit it (:mod:`serverkit.descriptors`);
* :class:`LogThrottle`: at most a few log lines per kind and interval, with the number dropped
  (:mod:`serverkit.logthrottle`);
* :class:`SingleFlight`: one in-flight call shared by every concurrent caller, e.g. the Redis
  ``PING`` of ``/readyz`` probes, and :class:`KeyedSingleFlight`, one per key, e.g. the history
  read of polls at one cursor (:mod:`serverkit.singleflight`).
"""

from __future__ import annotations

from serverkit.descriptors import LIMIT_HINT, raise_descriptor_limit, warn_lowered
from serverkit.logthrottle import LogThrottle
from serverkit.singleflight import KeyedSingleFlight, SingleFlight

__all__ = [
    "LIMIT_HINT",
    "KeyedSingleFlight",
    "LogThrottle",
    "SingleFlight",
    "raise_descriptor_limit",
    "warn_lowered",
]
