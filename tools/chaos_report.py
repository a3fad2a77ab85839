"""What a chaos run's journal and logs say about each fault (``tools/chaos.py``).

Log lines are the CLIs' format (``%(asctime)s %(levelname)s %(name)s: %(message)s``), so each has a wall
time; a fault's window runs from its injection to the next fault's (or the end of the run). Reading is
here; the selection (``pick``, ``lost_completed_hops``) is pure.
"""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")

# what the logs say when the broker went away (label, text in the line)
BROKER_SIGNS = {
    "links_back_session_resumed": "(session resumed)",
    "links_back_session_new": "(session new)",
    "chunk_requests": "chunks missing",
    "chunk_resends": "resending",
    "whole_resends": "no ack for transfer",
}


@dataclass(frozen=True)
class LogLine:
    wall: float  # seconds since the epoch
    source: str  # the log file's stem: coordinator, agent-0, ...
    level: str
    name: str  # the logger
    text: str


def read_logs(out: Path) -> list[LogLine]:
    """Every timestamped line of ``out/logs/*.log``, in time order."""
    lines = []
    for path in sorted((out / "logs").glob("*.log")):
        for raw in path.read_text(errors="replace").splitlines():
            m = LINE.match(raw)
            if m:
                wall = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                lines.append(LogLine(wall, path.stem, m.group(2), m.group(3), m.group(4)))
    return sorted(lines, key=lambda line: line.wall)


def journal_hops_finished(out: Path) -> list[int]:
    """The hop of every ``hop_finished`` in the coordinator's journal, in order (across its lives)."""
    import json

    db = sqlite3.connect(out / "journal.sqlite")
    try:
        rows = db.execute("SELECT body FROM events WHERE kind = 'hop_finished' ORDER BY seq").fetchall()
    finally:
        db.close()
    return [int(json.loads(body)["report"]["hop"]) for (body,) in rows]


def lost_completed_hops(finished: Iterable[int]) -> int:
    """Completed hops whose model was trained again: every ``hop_finished`` of a hop after its first."""
    return sum(n - 1 for n in Counter(finished).values())


def window(record: dict[str, Any], records: list[dict[str, Any]]) -> tuple[float, float]:
    later = [r["wall"] for r in records if r["wall"] > record["wall"]]
    return record["wall"], min(later, default=float("inf"))


def pick(lines: list[LogLine], record: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """What the trial reported for one injected fault, from the log lines inside its window."""
    if not record.get("injected"):
        return {}
    start, end = window(record, records)
    inside = [line for line in lines if start - 0.05 <= line.wall < end]
    coordinator = [line for line in inside if line.source == "coordinator"]
    faults = [line.text for line in coordinator if line.text.startswith("fault at")]
    if record["kind"] == "agent":
        mine = [
            line.text for line in coordinator if record["target"] in line.text and line.name == "coordinator.controller"
        ]
        return {"coordinator_faults": [f for f in faults if record["target"] in f], "coordinator_says": mine[:5]}
    if record["kind"] == "coordinator":  # the resumed coordinator's first words may come after the next fault
        resumed = [line.text for line in lines if line.wall >= start and line.text.startswith("resuming trial")]
        return {"resumed": resumed[:1], "coordinator_faults": faults}
    counts = {label: sum(sign in line.text for line in inside) for label, sign in BROKER_SIGNS.items()}
    return counts | {"coordinator_faults": faults}


def fault_report(out: Path, record: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    return pick(read_logs(out), record, records)
