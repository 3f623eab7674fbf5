"""``python -m gateway`` / ``eventbus-gateway``: run one gateway process."""

from __future__ import annotations

import asyncio
import sys

from gateway.config import ConfigError, load_config
from gateway.logs import configure_logging


def main(argv: list[str] | None = None) -> None:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        sys.stderr.write(f"python -m gateway: {exc}\n")
        raise SystemExit(2) from None
    configure_logging(config.log_format, config.log_level)
    from gateway.server import run

    asyncio.run(run(config))


if __name__ == "__main__":
    main()
