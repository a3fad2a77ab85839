"""The coordinator process for one trial: wires the pure ``Controller`` to MQTT and a reporter."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.controller import Controller, Event, TrialSetup
from coordinator.errors import TrialError
from edge_agent.mqtt import MqttLink, parse_broker_url
from edge_agent.protocol import topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    final_model: bytes | None
    failed: str | None
    bytes_sent: int
    bytes_received: int
    wall_s: float


class TrialService:
    def __init__(self, broker: str, setup: TrialSetup, on_event: Callable[[Event], None], tick_s: float = 0.5) -> None:
        self.setup = setup
        self.on_event = on_event
        self.tick_s = tick_s
        self.link = MqttLink(
            parse_broker_url(broker),
            client_id=f"snake-coordinator-{setup.trial_id}",
            subscriptions=[topics.coordinator_inbox(), topics.ALL_AGENT_STATUS],
            clean_session=True,
        )
        self.controller: Controller | None = None

    def run(self, exit_agents: bool, stop: Callable[[], bool] = lambda: False, bye_timeout_s: float = 15.0) -> Outcome:
        """Run the trial to its end (or failure); then tell agents to shut down and collect their byes."""
        started = time.monotonic()
        self.link.start(timeout=30.0)
        ctl = self.controller = Controller(self.setup, time.time())
        try:
            self._loop(ctl, lambda: ctl.finished or stop())
            if not ctl.finished:
                raise TrialError("interrupted")
            self._publish(ctl.shutdown(time.time(), exit_agents))
            expected = set(ctl.tasks or ctl.hellos)
            deadline = time.monotonic() + bye_timeout_s
            self._loop(ctl, lambda: expected <= set(ctl.byes) or time.monotonic() > deadline)
            missing = expected - set(ctl.byes)
            if missing:
                log.warning("no final figures from %s", ", ".join(sorted(missing)))
            self.link.wait_published(timeout=10.0)
        finally:
            self.link.stop()
        return Outcome(
            ctl.final_model, ctl.failed, self.link.bytes_sent, self.link.bytes_received, time.monotonic() - started
        )

    def _loop(self, ctl: Controller, done: Callable[[], bool]) -> None:
        next_tick = time.monotonic()
        while not done():
            msg = self.link.get(timeout=0.05)
            while msg is not None:  # drain what is queued before timers run: an ack waiting here is not lost
                step = ctl.handle(msg.topic, msg.payload, time.time())
                for event in step.events:  # before publishing: a round's figures exclude the next round's sends
                    self.on_event(event)
                self._publish(step.out)
                msg = self.link.get(timeout=0)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self.tick_s
                step = ctl.tick(time.time())
                self._publish(step.out)
                for event in step.events:
                    self.on_event(event)

    def _publish(self, out: list) -> None:  # type: ignore[type-arg]
        for o in out:
            self.link.publish(o.topic, o.payload, o.retain)
