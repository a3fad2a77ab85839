"""A trial's journal: what the coordinator must not forget, in SQLite (WAL), so a killed coordinator resumes.

The journal is the controller's event log plus a few figures: who joined (hellos), the plan as first
made and every re-plan, each finished hop (its ``hop_done`` report: the model chain by digest), faults,
round evaluations, and counters. Each event is one committed transaction, written before the event's
messages are published, so after a SIGKILL the journal holds every hop the coordinator knew was done.
Replaying it rebuilds the run record (``metrics.jsonl`` etc.) and the controller's state
(:meth:`coordinator.controller.Controller.resume`). Client-server trials also keep the model the
coordinator holds (it relays every hop) in ``RUN_DIR/journal-model.safetensors``, replaced atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.errors import ConfigError
from coordinator.events import (
    Event,
    Excluded,
    Fault,
    HopFinished,
    Joined,
    Planned,
    Replanned,
    RoundEvaluated,
    SaidBye,
)
from coordinator.plan import Plan, PlannedHop, Segment
from edge_agent.protocol.messages import Bye, Hello, HopDone, body_of, to_body

FILE = "journal.sqlite"
MODEL_FILE = "journal-model.safetensors"


def plan_to_json(plan: Plan) -> dict[str, Any]:
    return dataclasses.asdict(plan)


def plan_from_json(data: Mapping[str, Any]) -> Plan:
    return Plan(
        mode=data["mode"],
        segments=tuple(
            Segment(s["index"], tuple(s["groups"]), tuple(s["params"]), tuple(s["tensors"]), s["num_params"])
            for s in data["segments"]
        ),  # fmt: skip
        hops=tuple(PlannedHop(**h) for h in data["hops"]),
        algorithm=data["algorithm"],
        excluded=tuple((a, r) for a, r in data["excluded"]),
        layout=tuple((g, tuple(p)) for g, p in data["layout"]),
    )


def event_to_json(event: Event) -> tuple[str, dict[str, Any]] | None:
    """The events a resumed trial needs, as (kind, JSON body); None for the others."""
    if isinstance(event, Joined):
        return "joined", {"agent": event.agent, "hello": to_body(event.hello)}
    if isinstance(event, Excluded):
        return "excluded", {"agent": event.agent, "reason": event.reason}
    if isinstance(event, Planned):
        return "planned", {"plan": plan_to_json(event.plan)}
    if isinstance(event, Replanned):
        return "replanned", {"plan": plan_to_json(event.plan), "start": event.start}
    if isinstance(event, HopFinished):
        return "hop_finished", {"agent": event.agent, "report": to_body(event.report), "hop_s": event.hop_s}
    if isinstance(event, Fault):
        return "fault", dataclasses.asdict(event)
    if isinstance(event, RoundEvaluated):
        return "round_evaluated", dataclasses.asdict(event)
    if isinstance(event, SaidBye):
        return "said_bye", {"agent": event.agent, "bye": to_body(event.bye)}
    return None


def event_from_json(kind: str, body: Mapping[str, Any]) -> Event:
    if kind == "joined":
        return Joined(body["agent"], body_of(Hello, body["hello"]))
    if kind == "excluded":
        return Excluded(body["agent"], body["reason"])
    if kind == "planned":
        return Planned(plan_from_json(body["plan"]))
    if kind == "replanned":
        return Replanned(plan_from_json(body["plan"]), body["start"])
    if kind == "hop_finished":
        return HopFinished(body["agent"], body_of(HopDone, body["report"]), body["hop_s"])
    if kind == "fault":
        return Fault(**body)
    if kind == "round_evaluated":
        return RoundEvaluated(**body)
    if kind == "said_bye":
        return SaidBye(body["agent"], body_of(Bye, body["bye"]))
    raise ValueError(f"unknown journal event {kind!r}")


@dataclass
class Journaled:
    """What a journal holds, read back."""

    trial_id: str
    config: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    model: tuple[int, bytes] | None = None  # client-server: (hop whose input it is, the model)


class Journal:
    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / FILE
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, body TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
            """
        )

    @classmethod
    def exists(cls, run_dir: Path) -> bool:
        return (Path(run_dir) / FILE).is_file()

    def start(self, trial_id: str, config: Mapping[str, Any]) -> None:
        """A new trial: the journal must be empty (a run directory holds one trial)."""
        if self.db.execute("SELECT 1 FROM meta WHERE key = 'trial_id'").fetchone():
            raise ConfigError(f"{self.dir} already holds a trial; resume it with --resume or choose another --out")
        with self._tx():
            self.db.execute("INSERT INTO meta VALUES ('trial_id', ?)", (trial_id,))
            self.db.execute("INSERT INTO meta VALUES ('config', ?)", (json.dumps(config, sort_keys=True, default=str),))

    def record(self, event: Event) -> None:
        item = event_to_json(event)
        if item is not None:
            with self._tx():
                self.db.execute("INSERT INTO events (kind, body) VALUES (?, ?)", (item[0], json.dumps(item[1])))

    def count(self, counters: Mapping[str, int]) -> None:
        with self._tx():
            self.db.executemany("INSERT OR REPLACE INTO counters VALUES (?, ?)", list(counters.items()))

    def keep_model(self, hop: int, model: bytes) -> None:
        """Client-server: the model the coordinator holds now (the input of ``hop``), crash-safe."""
        path = self.dir / MODEL_FILE
        tmp = path.with_name(f".{MODEL_FILE}.tmp")
        with tmp.open("wb") as fh:
            fh.write(hop.to_bytes(8, "big") + model)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def read(self) -> Journaled:
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        if "trial_id" not in meta:
            raise ConfigError(f"{self.path} holds no trial to resume")
        events = [
            event_from_json(k, json.loads(b)) for k, b in self.db.execute("SELECT kind, body FROM events ORDER BY seq")
        ]
        counters = dict(self.db.execute("SELECT key, value FROM counters").fetchall())
        model = None
        path = self.dir / MODEL_FILE
        if path.is_file():
            raw = path.read_bytes()
            model = (int.from_bytes(raw[:8], "big"), raw[8:])
        return Journaled(meta["trial_id"], json.loads(meta["config"]), events, counters, model)

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> _Tx:
        return _Tx(self.db)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
