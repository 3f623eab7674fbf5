"""The code blocks of the docs, for tests that run them as written, and the contract's example
blocker to publish at them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from schemas import Blocker

__all__ = ["DOCS", "code_block", "contract_blocker", "shell_line"]

DOCS = Path(__file__).resolve().parents[2] / "docs"


def code_block(doc: str, language: str, marker: str) -> str:
    """The one ```<language> block of ``docs/<doc>`` that contains ``marker``."""
    text = (DOCS / doc).read_text()
    blocks = [block.split("```", 1)[0] for block in text.split(f"```{language}\n")[1:]]
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"{doc}: {len(found)} {language} blocks contain {marker!r}"
    return found[0]


def shell_line(doc: str, marker: str) -> str:
    """The one line of a ```sh block of ``docs/<doc>`` that contains ``marker``, its comment
    cut."""
    text = (DOCS / doc).read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```sh\n")[1:]]
    lines = [line for block in blocks for line in block.splitlines() if marker in line]
    assert len(lines) == 1, f"{doc}: {len(lines)} shell lines contain {marker!r}"
    return lines[0].partition("  #")[0].strip()


def contract_blocker(
    blocker_id: int = 123, blocker_type: str = "SYNC", question: str = "JWT or sessions?"
) -> Blocker:
    """The contract's example blocker, with the id, type and question a test needs."""
    return Blocker(
        id=blocker_id,
        agent_id="backend-worker-001",
        agent_name="Backend Worker #1",
        task_id=456,
        task_title="Implement authentication",
        blocker_type=blocker_type,  # type: ignore[arg-type]
        question=question,
        status="PENDING",
        created_at=datetime(2025, 11, 8, 12, 34, 56, tzinfo=UTC),
    )
