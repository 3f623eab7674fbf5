"""``python -m bench.gateway_uvloop``: the gateway on uvloop (``--loop uvloop``) instead of
asyncio's own event loop, the default; :mod:`bench.storm` runs it beside the default to show what
the loop is worth. Same flags as ``python -m gateway``."""

from __future__ import annotations

import sys

from gateway.__main__ import main

if __name__ == "__main__":
    main([*sys.argv[1:], "--loop", "uvloop"])
