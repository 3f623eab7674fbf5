"""A server's descriptor limit: raised at start as far as the process may, and the warning when a
bound of the server had to be lowered to fit it (past the limit every accept fails, so the
server's own bound on connections must refuse them first)."""

from __future__ import annotations

import contextlib
import resource
from typing import Any

__all__ = ["LIMIT_HINT", "UNLIMITED_TARGET", "raise_descriptor_limit", "warn_lowered"]

#: What an operator can do about a limit too low for the configured bound.
LIMIT_HINT = "raise the limit (ulimit -n, LimitNOFILE=, the container runtime's nofile)"
#: The soft limit asked for when the hard one is unlimited (none is ever needed beyond it).
UNLIMITED_TARGET = 1_048_576


def raise_descriptor_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (to :data:`UNLIMITED_TARGET`, or the
    soft one if higher, when the hard one is unlimited); return the soft limit then in force.

    An unprivileged process may raise its soft limit up to the hard one, and distributions start
    services with a soft limit of 1,024 under a hard one of 500,000 or more. When the system
    refuses (a container's seccomp profile, say), the limit stays as it was: the caller fits its
    bounds to what is returned."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, UNLIMITED_TARGET)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def warn_lowered(log: Any, setting: str, configured: int, effective: int, limit: int) -> None:
    """Log (``log``: a structlog logger) that ``setting`` was lowered from ``configured`` to
    ``effective`` to fit the descriptor ``limit``, with :data:`LIMIT_HINT`."""
    log.warning(
        f"{setting} lowered to fit the descriptor limit",
        configured=configured,
        effective=effective,
        descriptor_limit=limit,
        hint=LIMIT_HINT,
    )
