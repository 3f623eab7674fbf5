"""``python -m bench.gateway_without_window``: the gateway with resume windows of 0 events, the
baseline of :mod:`bench.storm` (every resume behind the feed reads its history from Redis, as
before the windows existed). Same flags as ``python -m gateway``."""

from __future__ import annotations

import gateway.hub
from gateway.__main__ import main

gateway.hub.WINDOW_EVENTS = 0

if __name__ == "__main__":
    main()
