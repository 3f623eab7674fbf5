"""``python -m bench.gateway_asyncio_loop``: the gateway on asyncio's own event loop
(``--loop asyncio``) instead of uvloop, the default where it is installed; :mod:`bench.storm` and
:mod:`bench.density` run it beside the default to show what the loop is worth. Same flags as
``python -m gateway``."""

from __future__ import annotations

import sys

from gateway.__main__ import main

if __name__ == "__main__":
    main([*sys.argv[1:], "--loop", "asyncio"])
