"""Agent processes log to files, out of reach of the in-process ERROR check (tests/conftest.py): after every
integration test, every agent log under the test's tmp_path must be free of tracebacks and ERROR lines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

MARKERS = ("Traceback", " ERROR ")


def agent_log_problems(root: Path) -> list[str]:
    """``file:line: text`` of every traceback or ERROR line in ``root``'s ``logs/agent-*.log`` (any depth)."""
    problems = []
    for path in sorted(root.rglob("logs/agent-*.log")):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if any(marker in line for marker in MARKERS):
                problems.append(f"{path.relative_to(root)}:{number}: {line.strip()[:200]}")
    return problems


@pytest.fixture(autouse=True)
def no_errors_in_agent_logs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """Fails a test whose agents logged a traceback or an ERROR (unless it is marked ``expect_errors``)."""
    yield
    if request.node.get_closest_marker("expect_errors"):
        return
    problems = agent_log_problems(tmp_path)
    assert not problems, "agent log(s) show errors:\n  " + "\n  ".join(problems[:10])
