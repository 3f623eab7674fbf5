"""``python -m bench.gateway_small_window``: the gateway with resume windows of 50 events
(``--resume-window-events 50``), for :mod:`bench.storm` (``--servers "small window"``): its
clients, 100 events behind, resume from further back than the window, so every resume reads
its history from Redis while the window holds the newest half of what it reads (whose frames are
not checked again: docs/architecture.md, "The frame check on resumes"). Same flags as ``python
-m gateway``."""

from __future__ import annotations

import sys

from gateway.__main__ import main

if __name__ == "__main__":
    main([*sys.argv[1:], "--resume-window-events", "50"])
