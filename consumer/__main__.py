"""``python -m consumer tail PROJECT_ID ...``: see :mod:`consumer.tail`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from consumer import tail

USAGE = "usage: python -m consumer tail PROJECT_ID [PROJECT_ID ...] [options]  (tail --help)\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "tail":
        sys.stderr.write(USAGE)
        return 0 if args and args[0] in ("-h", "--help") else 2
    return tail.main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
