"""``python -m bench.profiled_gateway``: the gateway under cProfile (same flags as
``python -m gateway``); the stats are written to ``$BENCH_PROFILE_OUT`` (default
``gateway.prof``) when it exits (SIGTERM drains it, then it exits normally). Used to find the
costs of the handshake and subscribe path (docs/benchmarks.md), e.g.::

    BENCH_PROFILE_OUT=/tmp/gw.prof python -m bench.storm --quick --servers profiled
"""

from __future__ import annotations

import cProfile
import os

from gateway.__main__ import main

if __name__ == "__main__":
    profile = cProfile.Profile()
    profile.enable()
    try:
        main()
    finally:
        profile.disable()
        profile.dump_stats(os.environ.get("BENCH_PROFILE_OUT", "gateway.prof"))
