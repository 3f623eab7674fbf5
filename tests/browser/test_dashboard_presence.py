"""Presence in the reference dashboard, with two browser contexts as two people (issue 12).

Each context is one person (the page keeps its id and name in localStorage; the test sets them
before the page loads); pages of one context are tabs of one person. Everything is awaited
through the page (Playwright's ``expect`` retries until its timeout), never slept on.
"""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import Page, expect

from tests.browser.dashboard_helpers import blocker_item, raise_blocker
from tests.support.dashboard_api import api

pytestmark = pytest.mark.browser

#: Presence reaches other pages within ~1.1 s (write 0.1 s + one diff interval of 1 s).
PRESENCE_TIMEOUT = 6_000


def as_person(person_id: str, name: str):
    def setup(page: Page) -> None:
        person = json.dumps({"id": person_id, "name": name})
        page.add_init_script(f"localStorage.setItem('eventbus-demo-person', {json.dumps(person)})")

    return setup


def members(page: Page):
    return page.get_by_test_id("presence-member")


def test_two_people_see_each_other_what_they_do_and_get_warned_before_a_second_answer(
    demo, new_page
):
    blocker = raise_blocker(demo, "SYNC", "JWT or sessions?")
    alice = new_page(demo.url, setup=as_person("p-alice", "Alice"))
    bob = new_page(demo.url, setup=as_person("p-bob", "Bob"))

    # Who is online: both avatars on both pages, named.
    for page in (alice, bob):
        expect(members(page)).to_have_count(2, timeout=PRESENCE_TIMEOUT)
    expect(bob.locator('[data-member-id="p-alice"]')).to_have_attribute("data-name", "Alice")
    expect(bob.get_by_test_id("presence-count")).to_have_text("2 online")

    # Alice opens the blocker: Bob's card says she is viewing it; then that she is answering.
    card = blocker_item(bob, blocker["id"])
    expect(card.get_by_test_id("blocker-presence")).to_have_count(0)
    blocker_item(alice, blocker["id"]).get_by_test_id("answer-button").click()
    expect(card.get_by_test_id("blocker-presence")).to_have_text(
        "Alice is viewing", timeout=PRESENCE_TIMEOUT
    )
    # ...and, asked of the backend once presence shows her on it, that she saw it first.
    expect(card.get_by_test_id("blocker-seen")).to_have_text(
        re.compile(r"seen by Alice after \d+ s")
    )
    alice.get_by_test_id("answer-input").fill("Sessions, I think")
    expect(card.get_by_test_id("blocker-presence")).to_have_text(
        "Alice is answering…", timeout=PRESENCE_TIMEOUT
    )
    expect(bob.locator('[data-member-id="p-alice"]')).to_have_attribute(
        "title", f"Alice (answering #{blocker['id']})"
    )
    # Alice's own card shows nobody (she is not "someone else"), and that she saw it first.
    own = blocker_item(alice, blocker["id"])
    expect(own.get_by_test_id("blocker-presence")).to_have_count(0)
    expect(own.get_by_test_id("blocker-seen")).to_have_text(
        re.compile(r"seen by Alice after \d+ s")
    )
    expect(alice.get_by_test_id("activity-item").first).to_contain_text("first seen by Alice")

    # Bob opens it too: the modal says Alice is answering; his first send only warns.
    card.get_by_test_id("answer-button").click()
    modal = bob.get_by_test_id("answer-modal")
    expect(modal.get_by_test_id("modal-presence")).to_have_text("Alice is answering…")
    bob.get_by_test_id("answer-input").fill("Use JWT for stateless API")
    bob.get_by_test_id("answer-submit").click()
    expect(modal.get_by_test_id("answer-warning")).to_have_text(
        "Alice is answering this blocker too. Send yours anyway?"
    )
    expect(bob.get_by_test_id("answer-submit")).to_have_text("Send anyway")
    assert api(demo, "GET", f"/api/blockers/{blocker['id']}")[1]["status"] == "PENDING"
    # Alice sees Bob answering in her modal meanwhile.
    expect(alice.get_by_test_id("modal-presence")).to_have_text(
        "Bob is answering…", timeout=PRESENCE_TIMEOUT
    )

    # The second click sends it; Alice's modal closes with the blocker_resolved event.
    bob.get_by_test_id("answer-submit").click()
    expect(modal).to_be_hidden()
    expect(alice.get_by_test_id("answer-modal")).to_be_hidden()
    stored = api(demo, "GET", f"/api/blockers/{blocker['id']}")[1]
    assert (stored["status"], stored["answer"], stored["first_seen_by"]) == (
        "RESOLVED",
        "Use JWT for stateless API",
        "Alice",
    )

    # Alice closes her page: she leaves Bob's view within about a second.
    alice.close()
    expect(members(bob)).to_have_count(1, timeout=PRESENCE_TIMEOUT)
    expect(bob.locator('[data-member-id="p-bob"]')).to_have_attribute("title", "Bob (you)")


def test_two_tabs_of_one_person_are_one_member(demo, new_page):
    blocker = raise_blocker(demo, "ASYNC", "Which queue?")
    carol = new_page(demo.url, setup=as_person("p-carol", "Carol"))
    carol_tab = carol.context.new_page()
    carol_tab.goto(demo.url)
    dave = new_page(demo.url, setup=as_person("p-dave", "Dave"))
    for page in (carol, carol_tab, dave):
        expect(members(page)).to_have_count(2, timeout=PRESENCE_TIMEOUT)
    # The tab that reported last wins: Carol views the blocker in one tab, Dave sees it.
    blocker_item(carol_tab, blocker["id"]).get_by_test_id("answer-button").click()
    expect(blocker_item(dave, blocker["id"]).get_by_test_id("blocker-presence")).to_have_text(
        "Carol is viewing", timeout=PRESENCE_TIMEOUT
    )
    # One tab closes: Carol is still here (her other tab), so Dave keeps two members.
    carol_tab.close()
    expect(blocker_item(dave, blocker["id"]).get_by_test_id("blocker-presence")).to_have_count(
        0, timeout=PRESENCE_TIMEOUT
    )
    expect(members(dave)).to_have_count(2)


def test_a_hostile_name_is_shown_as_text_everywhere(demo, new_page):
    # Names come from other people (the token's name claim): markup in one is text, not HTML.
    hostile = '<img src=x onerror="window.pwned=1">'
    blocker = raise_blocker(demo, "SYNC", "Which cache?")
    mallory = new_page(demo.url, setup=as_person("p-mallory", hostile))
    erin = new_page(demo.url, setup=as_person("p-erin", "Erin"))
    blocker_item(mallory, blocker["id"]).get_by_test_id("answer-button").click()
    mallory.get_by_test_id("answer-input").fill("typing")
    card = blocker_item(erin, blocker["id"])
    expect(card.get_by_test_id("blocker-presence")).to_have_text(
        f"{hostile} is answering…", timeout=PRESENCE_TIMEOUT
    )
    expect(erin.locator('[data-member-id="p-mallory"]')).to_have_attribute("data-name", hostile)
    expect(card.get_by_test_id("blocker-seen")).to_contain_text(f"seen by {hostile}")
    feed = mallory.get_by_test_id("activity-item").first
    expect(feed).to_contain_text(f"first seen by {hostile}")
    for page in (mallory, erin):
        assert page.evaluate("window.pwned") is None
        assert page.locator("img[src='x']").count() == 0
