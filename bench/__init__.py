"""Benchmarks, run by ``make bench`` (``python -m bench``); figures go to ``docs/benchmarks.md``.

Each benchmark is a module ``bench.<name>`` with ``main(argv: list[str] | None) -> int`` that
accepts at least ``--quick`` (a short smoke run) and ``--json PATH`` (also write the results
there), prints a human-readable summary, and starts whatever it measures itself (a private
``redis-server`` on a free port, never the machine's Redis on 6379). :mod:`bench.common` has the
shared helpers. ``python -m bench`` runs the modules listed in :data:`bench.__main__.MODULES`
that exist, in that order.
"""
