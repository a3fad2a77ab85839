"""The coordinator process for one trial: wires the pure ``Controller`` to a ``Link`` and runs its jobs.

Jobs (building artifacts, a split-learning back step, evaluating a round's model) run one at a time
in a worker thread, in the order the controller asked for them, while the loop keeps handling
messages and timers; each result goes back to the controller. Time comes from a ``Clock`` and the loop
can be stepped (``poll``), so tests drive the real service over an in-memory link.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from coordinator.controller import Controller, Step, TrialSetup
from coordinator.errors import TrialError
from coordinator.events import BackStep, BuildArtifacts, Built, EvaluateRound, Evaluation, Event, Job, Stepped
from edge_agent.link import Clock, Link, SystemClock
from edge_agent.mqtt import MqttLink, parse_broker_url
from edge_agent.protocol import topics
from edge_agent.protocol.transfer import Outgoing
from edge_agent.secure_link import SecureLink, load_secure_link
from edge_agent.tls import TlsFiles

log = logging.getLogger(__name__)


class Jobs(Protocol):
    """Runs the controller's slow work (in the service's worker thread)."""

    def build(self, job: BuildArtifacts) -> Built: ...

    def back_step(self, job: BackStep) -> Stepped: ...

    def evaluate(self, job: EvaluateRound) -> Evaluation: ...


def run_job(jobs: Jobs, job: Job) -> object:
    if isinstance(job, BuildArtifacts):
        return jobs.build(job)
    if isinstance(job, BackStep):
        return jobs.back_step(job)
    return jobs.evaluate(job)


def mqtt_link(broker: str, trial_id: str, provisioned: Path | None = None) -> Link:
    """A persistent session named after the trial: what agents send while the coordinator is away (its
    link down, the broker restarting, or the coordinator itself restarting to resume the same trial) is
    queued by the broker for it. Other trials' messages that reach the queue are refused by trial id. The
    session ends when the service stops the link (a killed coordinator leaves it for its successor).

    ``provisioned`` (``DIR/coordinator`` of ``snake-coordinator provision``): TLS with its client certificate,
    and every message signed and checked against the agents' keys."""
    tls = None
    if provisioned is not None:
        tls = TlsFiles.from_fields(provisioned / "ca.crt", provisioned / "client.crt", provisioned / "client.key")
    link = MqttLink(
        parse_broker_url(broker),
        client_id=f"snake-coordinator-{trial_id}",
        subscriptions=[topics.coordinator_inbox(), topics.ALL_AGENT_STATUS],
        clean_session=False,
        forget_session_on_stop=True,  # a finished trial's session would queue later trials' traffic for nobody
        tls_files=tls,
    )
    if provisioned is None:
        return link
    return load_secure_link(link, topics.COORDINATOR, provisioned / "signing.key", provisioned / "trust", SystemClock())


@dataclass(frozen=True)
class Outcome:
    final_model: bytes | None
    failed: str | None
    bytes_sent: int
    bytes_received: int
    wall_s: float


class TrialService:
    def __init__(
        self,
        link: Link,
        setup: TrialSetup,
        jobs: Jobs,
        on_event: Callable[[Event], None],
        clock: Clock | None = None,
        executor: Executor | None = None,
        tick_s: float = 0.5,
        resume_from: tuple[list[Event], Mapping[str, int], tuple[int, bytes] | None] | None = None,
    ) -> None:
        self.link, self.setup, self.jobs, self.on_event = link, setup, jobs, on_event
        self.clock = clock or SystemClock()
        self.pool = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="coordinator-job")
        self.tick_s = tick_s
        self.resume_from = resume_from  # a journal's events, counters and held model: carry on a trial
        self.controller = Controller(setup, self.clock.time())
        if isinstance(link, SecureLink):  # refused signatures count with the coordinator's other rejections
            link.guard.rejections = self.controller.rejections
        self.running: deque[tuple[Job, Future[object]]] = deque()
        self._next_tick = 0.0

    def run(self, exit_agents: bool, stop: Callable[[], bool] = lambda: False, bye_timeout_s: float = 15.0) -> Outcome:
        """Run the trial to its end (or failure); then tell agents to shut down and collect their byes."""
        started = self.clock.monotonic()
        self.start()
        ctl = self.controller
        try:
            self._loop(lambda: ctl.finished or stop())
            if not ctl.finished:
                raise TrialError("interrupted")
            if ctl.failed is None:
                self._loop(lambda: not self.running)  # the last round's evaluation
            deadline = self.finish(exit_agents, bye_timeout_s)
            self._loop(lambda: self.byes_complete or self.clock.monotonic() > deadline)
            missing = self.expected_byes - set(ctl.byes)
            if missing:
                log.warning("no final figures from %s", ", ".join(sorted(missing)))
            self.link.wait_published(timeout=10.0)
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.link.stop()
        c = self.link.counters()
        return Outcome(ctl.final_model, ctl.failed, c.bytes_sent, c.bytes_received, self.clock.monotonic() - started)

    def start(self) -> None:
        self.link.start(timeout=30.0)
        if self.resume_from is not None:
            self._apply(self.controller.resume(*self.resume_from, self.clock.time()))

    def finish(self, exit_agents: bool, bye_timeout_s: float) -> float:
        """Tell the agents the trial is over; returns the deadline for their byes."""
        self._publish(self.controller.shutdown(self.clock.time(), exit_agents))
        return self.clock.monotonic() + bye_timeout_s

    @property
    def expected_byes(self) -> set[str]:
        return set(self.controller.tasks or self.controller.hellos)

    @property
    def byes_complete(self) -> bool:
        return self.expected_byes <= set(self.controller.byes)

    def _loop(self, done: Callable[[], bool]) -> None:
        while not done():
            self.poll(timeout=0.05)

    def poll(self, timeout: float = 0.0) -> bool:
        """One turn: what is queued (so an ack waiting here is not lost to a timer), finished jobs, timers."""
        ctl, moved = self.controller, False
        msg = self.link.get(timeout=timeout)
        while msg is not None:
            moved = True
            step = ctl.handle(msg.topic, msg.payload, self.clock.time())  # never raises
            try:
                self._apply(step)
            except Exception as bug:  # a bug carrying out what a message asked: the loop goes on
                ctl.guard.internal(bug, f"carrying out a message on {msg.topic}")
            msg = self.link.get(timeout=0)
        while self.running and self.running[0][1].done():
            moved = True
            job, future = self.running.popleft()
            exc = future.exception()
            self._apply(ctl.job_done(job, exc if exc is not None else future.result(), self.clock.time()))
        if self.clock.monotonic() >= self._next_tick:
            self._next_tick = self.clock.monotonic() + self.tick_s
            if not self.link.connected:
                ctl.link_down(self.clock.time())
            self._apply(ctl.tick(self.clock.time()))
        return moved

    @property
    def busy(self) -> bool:
        """A job is running."""
        return bool(self.running)

    def _apply(self, step: Step) -> None:
        for event in step.events:  # before publishing: a round's figures exclude the next round's sends
            self.on_event(event)
        self._publish(step.out)
        for job in step.jobs:
            if isinstance(job, BuildArtifacts):
                log.info("building the artifacts of %d segment(s)", len(job.plan.segments))
            self.running.append((job, self.pool.submit(run_job, self.jobs, job)))

    def _publish(self, out: list[Outgoing]) -> None:
        for o in out:
            self.link.publish(o.topic, o.payload, o.retain)
