"""Dependencies point one way: ``schemas`` knows no I/O; the gateway, the publisher and the
consumer depend on ``schemas`` (and on ``redisconn`` for Redis clients, ``serverkit`` for what a
server process needs), never on each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"schemas", "publisher", "gateway", "consumer", "redisconn", "serverkit"}

#: package -> top-level modules it must never import (directly or by a lazy import inside code)
FORBIDDEN = {
    "schemas": PROJECT - {"schemas"} | {"redis", "websockets", "asyncio", "socket", "structlog"},
    "redisconn": PROJECT - {"redisconn"},
    "serverkit": PROJECT - {"serverkit"},
    "gateway": {"publisher", "consumer"},
    "publisher": {"gateway", "consumer"},
    "consumer": {"gateway", "publisher", "redisconn", "serverkit"},
}


#: The command line composes the packages (``eventbus-publish tail`` runs the consumer), and
#: the consumer's own command line (``tail``) takes its arguments as every other one does
#: (:mod:`serverkit.arguments`); the library modules themselves keep to the rule.
COMPOSERS = {"publisher/__main__.py": {"consumer"}, "consumer/tail.py": {"serverkit"}}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package: str) -> None:
    offenders = {
        name: sorted(imports(path) & FORBIDDEN[package] - COMPOSERS.get(name, set()))
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in [str(path.relative_to(ROOT))]
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"{package} must not import {sorted(FORBIDDEN[package])}: {offenders}"
