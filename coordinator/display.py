"""Live progress on stderr (rich) and log lines, from controller events. Display only: the run record
(``coordinator.results``) keeps the figures."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from coordinator.events import (
    Event,
    Fault,
    Finished,
    HopBegan,
    HopFinished,
    HopMoved,
    Joined,
    Planned,
    Replanned,
    RoundEvaluated,
    Warned,
)

log = logging.getLogger(__name__)


class TrialDisplay:
    """Turns controller events into a progress bar and log lines."""

    def __init__(self, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("hops"),
            TimeElapsedColumn(), console=self.console, disable=not enabled,
        )  # fmt: skip
        self.task = self.progress.add_task("waiting for agents", total=None)

    def __enter__(self) -> TrialDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def status(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Joined):
            h = event.hello
            log.info("%s joined (%s, %s, %d train samples)", event.agent, h.backend, h.arch, h.num_train)
        elif isinstance(event, Planned):
            for line in event.plan.describe():
                log.info("plan: %s", line)
            self.progress.update(self.task, total=len(event.plan.hops), completed=0)
            self.status("building the plan's artifacts")
        elif isinstance(event, HopBegan):
            b = event.report
            self.status(f"round {b.round} hop {b.hop} {event.agent} seg {b.segment}: training")
        elif isinstance(event, HopMoved):
            m = event.report
            self.status(f"round {m.round} hop {m.hop} {event.agent}: step {m.step}/{m.total_steps} loss {m.loss:.3f}")
        elif isinstance(event, HopFinished):
            self._hop_done(event)
        elif isinstance(event, RoundEvaluated):
            log.info("round %d: test accuracy %.4f (loss %.4f), %.1f MB so far",
                     event.round, event.accuracy, event.loss, event.bytes_so_far / 1e6)  # fmt: skip
        elif isinstance(event, Warned):
            log.warning("%s: %s", event.agent or "trial", event.text)
        elif isinstance(event, Fault):
            where = f" (hop {event.hop})" if event.hop is not None else ""
            log.warning("fault at %.0f s: %s %s%s: %s; %s", event.at_s, event.kind.replace("_", " "), event.agent,
                        where, event.detail, event.recovery)  # fmt: skip
        elif isinstance(event, Replanned):
            for line in event.plan.describe():
                if line.startswith("round"):
                    log.info("re-planned from hop %d: %s", event.start, line)
        elif isinstance(event, Finished):
            self.status("final model received")

    def _hop_done(self, event: HopFinished) -> None:
        r = event.report
        self.progress.advance(self.task)
        log.info(
            "hop %d round %d %s seg %d: loss %.4f, local val acc %s, %.1f s, %d bytes out",
            r.hop, r.round, event.agent, r.segment, r.train_loss,
            "n/a" if r.val_accuracy is None else f"{r.val_accuracy:.4f}", event.hop_s, r.model_bytes,
        )  # fmt: skip
