"""Small helpers shared by the dashboard browser tests."""

from __future__ import annotations

from playwright.sync_api import Page

from examples.dashboard.server import DemoApp
from tests.support.dashboard_api import api


def raise_blocker(
    app: DemoApp,
    blocker_type: str = "ASYNC",
    question: str = "Should we use JWT or sessions?",
    agent_id: str = "backend-worker-001",
    task_title: str | None = "Implement authentication",
) -> dict:
    """An agent raises a blocker (through the API, as the simulated agents do in-process)."""
    status, blocker = api(
        app,
        "POST",
        f"/api/projects/{app.config.project_id}/blockers",
        {
            "agent_id": agent_id,
            "blocker_type": blocker_type,
            "question": question,
            "task_title": task_title,
        },
    )
    assert status == 201, blocker
    return blocker


def resolve(app: DemoApp, blocker_id: int, answer: str = "Use JWT for stateless API") -> dict:
    status, body = api(app, "POST", f"/api/blockers/{blocker_id}/resolve", {"answer": answer})
    assert status == 200, body
    return body


def blocker_item(page: Page, blocker_id: int):
    return page.locator(f'[data-testid="blocker-item"][data-blocker-id="{blocker_id}"]')


def agent_card(page: Page, agent_id: str):
    return page.locator(f'[data-testid="agent-card"][data-agent-id="{agent_id}"]')


def agent_status(page: Page, agent_id: str):
    return agent_card(page, agent_id).get_by_test_id("agent-status")


def task_status(page: Page, task_id: int):
    return page.locator(f'[data-testid="task-row"][data-task-id="{task_id}"]').get_by_test_id(
        "task-status"
    )


def delivered_seqs(page: Page) -> list[int]:
    return page.evaluate("window.dashboard.events.map((e) => e.seq)")


def overflowing(page: Page) -> dict:
    """What sticks out sideways: the page's scroll width against the viewport, and any panel,
    card, row, toast or banner whose box leaves it (empty lists when nothing does)."""
    return page.evaluate(
        """() => {
          const width = window.innerWidth;
          const boxes = document.querySelectorAll(
            '.panel, .agent-card, .blocker, .toast, .sync-alert, .topbar, .modal, tr');
          const clipped = Array.from(boxes)
            .filter((node) => node.offsetParent !== null)
            .map((node) => [node.className || node.tagName, node.getBoundingClientRect()])
            .filter(([, r]) => r.left < -0.5 || r.right > width + 0.5)
            .map(([name, r]) => `${name}: ${Math.round(r.left)}..${Math.round(r.right)}`);
          return {scrollWidth: document.scrollingElement.scrollWidth, innerWidth: width, clipped};
        }"""
    )
