"""``python -m publisher.outbox relay|migrate`` (see :mod:`publisher.outbox.cli`)."""

import sys

from publisher.outbox.cli import main

if __name__ == "__main__":
    sys.exit(main())
