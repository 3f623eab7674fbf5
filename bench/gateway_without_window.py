"""``python -m bench.gateway_without_window``: the gateway with resume windows of 0 events
(``--resume-window-events 0``), the baseline of :mod:`bench.storm`: every resume behind the feed
reads its history from Redis, as before the windows existed. Same flags as ``python -m gateway``."""

from __future__ import annotations

import sys

from gateway.__main__ import main

if __name__ == "__main__":
    main([*sys.argv[1:], "--resume-window-events", "0"])
