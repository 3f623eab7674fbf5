"""Unit tests of the browser client (gateway/static/eventbus.js), run in chromium.

The tests themselves are JavaScript (``eventbus_unit.js``): each ``test("name", ...)`` there is
one pytest item here. The page is served from a fake origin by Playwright's router, so no server
is needed; the client gets fake WebSocket, fetch and clock through its injection points.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, Route

from schemas.tags import event_tag
from tests.browser.conftest import ROOT

pytestmark = pytest.mark.browser

UNIT_JS = Path(__file__).with_name("eventbus_unit.js")
CLIENT_JS = ROOT / "gateway" / "static" / "eventbus.js"
CLIENT_DTS = ROOT / "gateway" / "static" / "eventbus.d.ts"
NAMES = re.findall(r'^test\("([^"]+)"', UNIT_JS.read_text(), re.MULTILINE)
ORIGIN = "http://eventbus.test"
INDEX = """<!doctype html><meta charset="utf-8"><title>eventbus.js unit tests</title>
<script type="module">
  import * as unit from "/unit.js";
  window.unit = unit;
  window.unitReady = true;
</script>"""


@pytest.fixture(scope="module")
def unit_page(browser) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    def serve(route: Route) -> None:
        path = route.request.url.removeprefix(ORIGIN)
        files = {"/eventbus.js": CLIENT_JS, "/unit.js": UNIT_JS}
        if path == "/":
            route.fulfill(body=INDEX, content_type="text/html")
        elif path in files:
            route.fulfill(body=files[path].read_text(), content_type="text/javascript")
        else:
            route.fulfill(status=404, body="not found")

    page.route(f"{ORIGIN}/**", serve)
    page.goto(f"{ORIGIN}/")
    try:
        page.wait_for_function("window.unitReady === true", timeout=10_000)
    except Exception:
        pytest.fail(f"the unit test page did not load: {errors}", pytrace=False)
    yield page
    context.close()


def test_every_js_test_is_collected(unit_page: Page) -> None:
    assert unit_page.evaluate("window.unit.names()") == NAMES


# ids=NAMES: pytest replaces a string parameter over 100 characters by "name<N>" in the test's id,
# so that ``-k`` could not select those tests by their names; an explicit id is kept whole.
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_eventbus_js(unit_page: Page, name: str) -> None:
    result = unit_page.evaluate("(name) => window.unit.runTest(name)", name)
    assert result["ok"], result["error"]


def test_typescript_declarations_cover_every_export() -> None:
    source = CLIENT_JS.read_text()
    declarations = CLIENT_DTS.read_text()
    exported = set(re.findall(r"^export (?:const|function|class) (\w+)", source, re.MULTILINE))
    declared = set(
        re.findall(r"^export declare (?:const|function|class) (\w+)", declarations, re.MULTILINE)
    )
    assert exported == declared
    assert "export default connect;" in source and "export default connect;" in declarations


def _unicode_text(seed: int, length: int) -> str:
    """Text of every plane but surrogates (which UTF-8 cannot carry): 1- to 4-byte characters."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


#: Texts around SHA-1's block boundaries (55/56/64 bytes), with characters of 2, 3 and 4 bytes in
#: UTF-8, and real event frames.
TAG_TEXTS = [
    "",
    "abc",
    *("x" * n for n in (55, 56, 63, 64, 65, 119, 120, 128)),
    "caf\u00e9 na\u00efve fa\u00e7ade \u00c5ngstr\u00f6m",
    "\U0001f389\U0001f680 emoji \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\u65e5\u672c\u8a9e",
    "\u00e9" * 1000,
    '{"type":"blocker_resolved","project_id":1,"blocker_id":7,'
    '"answer":"d\u00e9j\u00e0 vu \U0001f600","resolved_at":"2025-11-08T12:45:30Z","seq":42}',
    '{"type": "blocker_resolved", "answer": "\\u00e9 escaped, not encoded", "seq": 1}',
    *(_unicode_text(seed, length) for seed, length in ((1, 17), (2, 300), (3, 5000))),
]


def test_event_tag_matches_python_hashlib(unit_page: Page) -> None:
    """eventTag in chromium (its own SHA-1 over TextEncoder's UTF-8) gives schemas.tags.event_tag
    of the same text's UTF-8 bytes: the tag a gateway computes of the frame it sent."""
    tags = unit_page.evaluate(
        """async (texts) => {
          const eb = await import("/eventbus.js");
          return texts.map((text) => eb.eventTag(text));
        }""",
        TAG_TEXTS,
    )
    assert tags == [event_tag(text.encode()) for text in TAG_TEXTS]
