"""Live progress on stderr (rich) and the bookkeeping of events into the run record."""

from __future__ import annotations

import logging
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from coordinator.controller import Event
from coordinator.plan import Plan
from coordinator.results import RunRecord

log = logging.getLogger(__name__)


class TrialDisplay:
    """Turns controller events into a progress bar, log lines and run-record entries."""

    def __init__(self, record: RunRecord, enabled: bool = True) -> None:
        self.record = record
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("hops"),
            TimeElapsedColumn(), console=self.console, disable=not enabled,
        )  # fmt: skip
        self.task = self.progress.add_task("waiting for agents", total=None)
        self.started: dict[int, float] = {}
        self.last_line: dict[str, Any] | None = None

    def __enter__(self) -> TrialDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def status(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def __call__(self, event: Event) -> None:
        body = event.body
        if event.kind == "joined":
            self.record.joined(body)
            log.info("%s joined (%s, %s, %d train samples)", event.agent, body.backend, body.arch, body.num_train)
        elif event.kind == "planned":
            plan: Plan = body
            for line in plan.describe():
                log.info("plan: %s", line)
            self.progress.update(self.task, total=len(plan.hops), completed=0)
        elif event.kind == "excluded":
            self.record.excluded[event.agent] = body
        elif event.kind == "hop_started":
            self.started[body.hop] = time.monotonic()
            self.status(f"round {body.round} hop {body.hop} {event.agent} seg {body.segment}: training")
        elif event.kind == "hop_progress":
            self.status(
                f"round {body.round} hop {body.hop} {event.agent}: step {body.step}/{body.total_steps} loss {body.loss:.3f}"
            )
        elif event.kind == "hop_done":
            self._hop_done(event)
        elif event.kind == "bye":
            self.record.bye(event.agent, body)
        elif event.kind == "warning":
            log.warning("%s: %s", event.agent or "trial", body)
        elif event.kind == "finished":
            self.status("final model received")

    def _hop_done(self, event: Event) -> None:
        body = event.body
        hop_s = time.monotonic() - self.started.get(body.hop, time.monotonic())
        line = self.record.hop_done(event.agent, body, hop_s)
        self.last_line = line
        self.progress.advance(self.task)
        log.info(
            "hop %d round %d %s seg %d: loss %.4f, local val acc %s, %.1f s, %d bytes out",
            body.hop, body.round, event.agent, body.segment, body.train_loss,
            "n/a" if body.val_accuracy is None else f"{body.val_accuracy:.4f}", hop_s, body.model_bytes,
        )  # fmt: skip
