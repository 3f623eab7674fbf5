"""Unit tests of the browser client (gateway/static/eventbus.js), run in chromium.

The tests themselves are JavaScript (``eventbus_unit.js``): each ``test("name", ...)`` there is
one pytest item here. The page is served from a fake origin by Playwright's router, so no server
is needed; the client gets fake WebSocket, fetch and clock through its injection points.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, Route

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


@pytest.mark.parametrize("name", NAMES)
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
