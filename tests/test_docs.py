"""The documentation stands on its own: every link resolves inside the repository (a link
to a section, to one of the page's headings), every test it cites exists, the contract page
(docs/contract.md) names every field of every event the code defines and answers the contract's
connection rules with eventbus.js's real defaults, docs/operations.md's
settings table gives the gateway's real defaults and its metrics table every metric it exports
(the samples run as written: tests/test_doc_samples.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from schemas.events import event_types

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
#: Files of the design brief this project started from; they are not in the repository.
OUTSIDE = re.compile(r"shared/(DESIGN\.md|contract/)")


def _local_targets(text: str) -> list[str]:
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, mailto:, an anchor on the same page
        targets.append(target.split("#", 1)[0])
    return targets


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(doc: Path):
    text = doc.read_text()
    for target in _local_targets(text):
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
        assert resolved.exists(), f"{doc.name} links to a missing file: {target}"
    mentions = OUTSIDE.findall(text)
    assert not mentions, f"{doc.name} refers to files that are not in the repository: {mentions}"


def _anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``doc`` (lowercased, punctuation dropped,
    spaces as hyphens; a repeated heading's gets -1, -2, ...), outside fenced code."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        heading = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_link_to_a_section_names_a_heading_there(doc: Path):
    """A link to a renamed section still opens the page, at its top: the reader is left to
    find the section, or to conclude it is gone."""
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or "#" not in target:
            continue
        path, anchor = target.split("#", 1)
        page = (doc.parent / path).resolve() if path else doc
        if page.suffix == ".md":
            assert anchor in _anchors(page), f"{doc.name} links to no heading: {target}"


def test_every_test_the_docs_cite_exists():
    """The docs cite tests as the evidence of what they state: a test renamed or removed leaves
    the statement with none."""
    sources = "\n".join(
        path.read_text() for path in (ROOT / "tests").rglob("*") if path.suffix in (".py", ".js")
    )
    defined = set(re.findall(r"(?:def|function)\s+(test_\w+)\s*\(", sources))
    cited = {name for doc in DOCS for name in re.findall(r"`(test_\w+)`", doc.read_text())}
    assert cited, "the docs cite no test: the pattern is wrong"
    assert sorted(cited - defined) == []


def test_protocol_page_lists_every_error_code_and_close_code():
    """docs/protocol.md's tables are where a client author learns what each code asks of them:
    a code the gateway (or a proxy in front of it) may send and the table leaves out is one
    their client meets unexplained."""
    from schemas.protocol import CloseCode, ErrorCode

    text = (ROOT / "docs/protocol.md").read_text()
    missing = [code.value for code in ErrorCode if f"| `{code.value}` |" not in text]
    missing += [
        f"{int(code)} {code.name}"
        for code in CloseCode
        if f"| {int(code)} | {code.name} |" not in text
    ]
    assert missing == []


def test_the_settings_table_gives_the_gateways_real_defaults():
    """docs/operations.md's table of settings: one row per setting of the gateway, each with
    its flag, its environment variable and the default the gateway takes when neither is set."""
    from gateway.config import ENV_PREFIX, _fields

    rows = {}
    for line in (ROOT / "docs/operations.md").read_text().splitlines():
        row = re.match(r"^\| `(EVENTBUS_[A-Z_]+)` \| `(--[a-z-]+)` \| ([^|]*) \|", line)
        if row:
            rows[row.group(2)] = (row.group(1), row.group(3).strip())
    for name, _, _, default in _fields():
        flag = "--" + name.replace("_", "-")
        assert flag in rows, f"docs/operations.md: no row for {flag}"
        env, shown = rows[flag]
        assert env == ENV_PREFIX + name.upper()
        if name == "sharded_pubsub":  # None: decided by the URL
            assert shown == "on for `+cluster` URLs"
            continue
        if default is None:
            expected = "unset"
        elif default is False:
            expected = "off"
        elif default == []:
            expected = "empty (any)"
        else:
            expected = f"`{default:g}`" if isinstance(default, float) else f"`{default}`"
        assert shown == expected, f"{flag}: {shown}, the default is {default!r}"


def _sections(text: str) -> dict[str, str]:
    """Level-3 sections of contract.md keyed by the event type in their heading."""
    parts = re.split(r"^### `([a-z_]+)`$", text, flags=re.M)
    return {parts[i]: parts[i + 1].split("\n## ", 1)[0] for i in range(1, len(parts), 2)}


def _field_paths(struct: type, prefix: str = "") -> list[str]:
    paths = []
    for field in msgspec.structs.fields(struct):
        paths.append(prefix + field.encode_name)
        kind = field.type
        if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
            paths.extend(_field_paths(kind, f"{prefix}{field.encode_name}."))
    return paths


def test_contract_page_names_every_field_of_every_event():
    sections = _sections((ROOT / "docs" / "contract.md").read_text())
    tags = {event.__struct_config__.tag: event for event in event_types()}
    assert set(sections) == set(tags), "one section per event type, no more"
    for tag, event in tags.items():
        section = sections[tag]
        for path in ["type", *_field_paths(event)]:
            assert f"| `{path}` |" in section, f"docs/contract.md, {tag}: field `{path}` missing"
        assert f'"type": "{tag}"' in section, f"{tag}: no example"


def test_contract_page_shows_the_contracts_examples_verbatim():
    """docs/contract.md restates the contract in full: each event's example is the contract's
    own JSON (kept in tests/test_schemas.py, which checks it against the contract file), so a
    reader needs nothing outside the repository."""
    from tests.test_schemas import CONTRACT_EXAMPLES

    sections = _sections((ROOT / "docs" / "contract.md").read_text())
    for tag, example in CONTRACT_EXAMPLES.items():
        blocks = re.findall(r"^```json\n(.*?)\n```", sections[tag], flags=re.S | re.M)
        assert blocks == [example], f"docs/contract.md, {tag}: not the contract's example"


# --- the demo runner's documented flags and defaults (docs/browser.md) ------------------------


def _runner_help(monkeypatch) -> str:
    for name in list(os.environ):
        if name.startswith("EVENTBUS_"):
            monkeypatch.delenv(name)
    from examples.dashboard.run import build_parser

    return build_parser().format_help()


def _backend_help() -> str:
    """`python -m examples.dashboard.server --help`, lines unwrapped, without EVENTBUS_* set."""
    result = subprocess.run(
        [sys.executable, "-m", "examples.dashboard.server", "--help"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())


def test_demo_environment_variables_in_the_docs_are_the_ones_help_lists(monkeypatch):
    help_text = " ".join(_runner_help(monkeypatch).split())  # argparse wraps lines
    backend_help = _backend_help()  # the backend alone also says where the gateway is
    documented = set(
        re.findall(r"EVENTBUS_DASHBOARD_[A-Z_]+", (ROOT / "docs/browser.md").read_text())
    )
    listed = set(re.findall(r"EVENTBUS_DASHBOARD_[A-Z_]+", help_text + backend_help))
    assert documented == listed
    for name in ("EVENTBUS_REDIS_URL", "EVENTBUS_PORT", "EVENTBUS_AUTH_SECRET"):
        assert f"[env {name}]" in help_text


def test_documented_blocker_ttl_defaults_are_the_real_ones(monkeypatch):
    from examples.dashboard.run import DEMO_BLOCKER_TTL, build_parser
    from examples.dashboard.server import Config

    _runner_help(monkeypatch)  # clears EVENTBUS_* first
    assert build_parser().parse_args([]).blocker_ttl == DEMO_BLOCKER_TTL == 180
    assert Config().blocker_ttl == 86_400
    docs = " ".join((ROOT / "docs/browser.md").read_text().split())
    assert "86,400 s (24 h) for the backend alone" in docs
    assert "180 s under `make run`" in docs
    assert "(default 180.0)" in " ".join(_runner_help(monkeypatch).split())


def test_the_demo_backend_alone_finds_a_gateway_on_its_default_port(monkeypatch):
    """`python -m examples.dashboard.server` says the gateway must already run: started with
    its defaults (`make gateway`), it listens on 8765. The backend pointed its page and its
    consumer at 8001, where nothing listens, unless given --gateway-port."""
    from examples.dashboard.server import Config
    from gateway.config import GatewayConfig

    _runner_help(monkeypatch)  # clears EVENTBUS_* first
    assert Config().gateway_port == GatewayConfig(no_auth=True).port == 8765
    assert "port of the gateway (default 8765)" in _backend_help()


def test_the_metrics_table_names_every_metric_the_gateway_exports():
    """docs/operations.md's metrics table is where an operator learns what a series means: a
    metric the gateway exports and the table leaves out is one their dashboards meet unexplained
    (and one the table names that is not exported, an alert that never fires)."""
    from gateway.config import GatewayConfig
    from gateway.group import SUPERVISOR_COUNTERS
    from gateway.metrics import Metrics
    from gateway.server import Gateway
    from schemas.stored import ForeignKind

    gateway = Gateway(GatewayConfig(no_auth=True))  # registers its gauges; nothing is started
    names = [*Metrics.COUNTERS, *gateway.metrics.gauges, *SUPERVISOR_COUNTERS]
    exported = {
        *(f"eventbus_{name}" for name in names),
        "eventbus_foreign_values_total",
        "eventbus_relay_lag_seconds",
        "eventbus_worker_ready",  # with --workers (gateway.group)
        "eventbus_workers",
    }
    rows = [
        line
        for line in (ROOT / "docs/operations.md").read_text().splitlines()
        if line.startswith("| `eventbus_")
    ]
    tabled = {
        name for row in rows for name in re.findall(r"`(eventbus_[a-z_]+)", row.split(" | ")[0])
    }
    assert sorted(exported - tabled) == [], "exported, not in the table"
    assert sorted(tabled - exported) == [], "in the table, not exported"
    foreign = next(row for row in rows if row.startswith("| `eventbus_foreign_values_total"))
    assert [kind.value for kind in ForeignKind if f"`{kind.value}`" not in foreign] == []


def test_the_contract_pages_connection_rules_are_eventbus_js_defaults():
    """docs/contract.md answers the contract's connection rules (reconnect 1 s to 30 s, poll
    every 10 s) with eventbus.js's figures: the defaults it ships must be those figures."""
    source = (ROOT / "gateway/static/eventbus.js").read_text()
    defaults = source[source.index("export const DEFAULTS") :]
    defaults = defaults[: defaults.index("\n});")]

    def value(name: str) -> str:
        return re.search(rf"\b{name}: ([\w.]+)", defaults).group(1)

    rows = (ROOT / "docs/contract.md").read_text().split("## Connection management", 1)[1]
    # each row: | the contract's rule | this project's answer |: the second cell is ours
    reconnection = next(row for row in rows.splitlines() if "**Reconnection**" in row)
    reconnection = reconnection.split(" | ")[1]
    fallback = next(row for row in rows.splitlines() if "**Fallback**" in row).split(" | ")[1]
    assert (value("initial"), value("max"), value("factor")) == ("1000", "30000", "2")
    assert "1, 2, 4, 8, 16, 30, 30, ... s" in reconnection
    assert f"±{round(float(value('jitter')) * 100)} % jitter" in reconnection
    assert f"stays up {int(value('stableAfter')) // 1000} s" in reconnection
    assert f"within {int(value('promptDelayMax')) / 1000:g} s" in reconnection
    assert value("sse") == "true" and "Server-Sent Events" in fallback
    assert f"every {int(value('pollInterval')) // 1000} s" in fallback
