"""A whole trial in one process: the real coordinator (``TrialService``) and a fleet of real agents
(``AgentService``) over the in-memory broker on a manual clock, with fake trainers and jobs
(``tools/fakes.py``). It measures the control plane (join, plan, build, hops, shutdown; messages and
bytes through the broker) at fleet sizes no machine could run with real training.

The model is a real layout's layer groups (names, parameter counts, activation and compute figures,
so the planner plans as for the real model) with one float tensor per group of ``scale`` times its
parameters (1.0: a real model's bytes travel).

Driving a thousand agents: a turn polls the coordinator and only the agents that can make progress (a
message due, a training run to collect, or whatever moved last turn); when nothing can, the clock jumps
to the next due message (or by half a second), and every agent gets a turn for its timers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordinator.controller import Controller, TrialSetup
from coordinator.events import BackStep, BuildArtifacts, Built, EvaluateRound, Evaluation, Event, Stepped
from coordinator.plan import GroupInfo, Plan
from coordinator.scheduler import HopSettings, snake_plan
from coordinator.service import TrialService
from edge_agent.config import AgentConfig
from edge_agent.data import Images
from edge_agent.link import ManualClock
from edge_agent.localdata import LocalData
from edge_agent.memlink import Delivery, MemoryBroker, MemoryLink
from edge_agent.protocol import topics
from edge_agent.protocol.codec import encode_tensors
from edge_agent.protocol.messages import Hello
from edge_agent.service import AgentService, status_payload
from tools.fakes import FakeJobs, FakeTrainers, InlineExecutor, MemoryModelCache

# per layer group: name, parameters, buffer floats, activation bytes and forward flops per sample
# (as coordinator.costs measures them on Fashion-MNIST; tests/coordinator/golden/layouts.json)
LAYOUTS: dict[str, list[tuple[str, int, int, int, int]]] = {
    "mlp": [("fc0", 401920, 0, 5184, 802816), ("fc1", 131328, 0, 1024, 262144), ("fc2", 32896, 0, 512, 65536),
            ("head", 1290, 0, 0, 2560)],
    "cnn": [("conv0", 352, 64, 254272, 451584), ("conv1", 18560, 128, 151040, 7225344),
            ("fc", 401536, 0, 13056, 802816), ("head", 1290, 0, 0, 2560)],
}  # fmt: skip


def layer_groups(layout: str) -> list[GroupInfo]:
    return [
        GroupInfo(g, (f"{g}.weight",), (f"{g}.stat",) if buf else (), p, buf, act, fl)
        for g, p, buf, act, fl in LAYOUTS[layout]
    ]


@dataclass
class Traffic:
    """Every publish through the broker (a ``Tamper`` that changes nothing): messages and bytes by kind."""

    messages: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # bytes

    def __call__(self, topic: str, payload: bytes) -> list[Delivery]:
        kind = "chunk" if payload[:4] == b"SNK1" else "status" if topic.endswith("/status") else "control"
        self.messages[kind] = self.messages.get(kind, 0) + 1
        self.sizes[kind] = self.sizes.get(kind, 0) + len(payload)
        return [Delivery(payload)]


@dataclass
class Timeline:
    """Wall-clock marks of a trial's phases (``time.perf_counter``) and the time spent planning and building."""

    started: float = 0.0
    planned: float = 0.0  # the Planned event: every agent joined and the plan is made
    built: float = 0.0
    finished: float = 0.0  # the final model arrived
    closed: float = 0.0  # every agent said bye
    plan_s: float = 0.0
    build_s: float = 0.0
    hops_done: list[float] = field(default_factory=list)  # when each hop_done arrived

    def phases(self) -> dict[str, float]:
        return {
            "join_s": self.planned - self.started - self.plan_s,
            "plan_s": self.plan_s,
            "build_s": self.build_s,
            "hops_s": self.finished - self.built,
            "shutdown_s": self.closed - self.finished,
            "wall_s": self.closed - self.started,
        }


def local_data(samples: int, seed: int) -> LocalData:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 255, (samples, 1, 2, 2), dtype=np.uint8)
    y = rng.integers(0, 10, samples)
    return LocalData(Images(x), y, Images(x[:2]), y[:2], 10)


class InMemoryTrial:
    """``agents`` agents and the coordinator; ``run`` drives the trial to its end and the agents' byes."""

    def __init__(self, work: Path, agents: int, layout: str = "cnn", rounds: int = 1, mode: str = "p2p",
                 scale: float = 1.0, chunk_bytes: int = 1 << 20, on_event: Callable[[Event], None] | None = None) -> None:  # fmt: skip
        self.clock = ManualClock()
        self.traffic = Traffic()
        self.broker = MemoryBroker(self.clock, self.traffic, record=False)
        self.groups = layer_groups(layout)
        self.timeline = Timeline()
        self.events: list[Event] = []
        self._on_event = on_event
        self.initial = {
            name: np.full(max(1, round(size * scale)), i, np.float32)
            for i, g in enumerate(self.groups)
            for name, size in ((g.params[0], g.num_params), *((b, g.num_buffer_elems) for b in g.buffers))
        }
        self.jobs = FakeJobs(self.groups, {k: v.shape for k, v in self.initial.items()})
        setup = TrialSetup(
            "bench", agents, self._plan(rounds, mode), encode_tensors(self.initial), HopSettings(1, 8, 0.1, 0, None),
            chunk_bytes, "none", 600.0, 900.0,
        )  # fmt: skip
        link = MemoryLink(self.broker, "coordinator", [topics.coordinator_inbox(), topics.ALL_AGENT_STATUS], clean_session=True)  # fmt: skip
        self.coordinator = TrialService(link, setup, self, self._event, self.clock, InlineExecutor())
        self.services = {f"a{i:04d}": self._agent(work, f"a{i:04d}", i) for i in range(agents)}
        self._moved: set[str] = set()

    @property
    def ctl(self) -> Controller:
        return self.coordinator.controller

    # -- the coordinator's side: its plan function and jobs, timed -----------------------------------
    def _plan(self, rounds: int, mode: str) -> Callable[[Mapping[str, Hello]], Plan]:
        def plan(hellos: Mapping[str, Hello]) -> Plan:
            t = time.perf_counter()
            made = snake_plan(sorted(hellos), self.groups, rounds, mode)
            self.timeline.plan_s += time.perf_counter() - t
            return made

        return plan

    def build(self, job: BuildArtifacts) -> Built:
        t = time.perf_counter()
        built = self.jobs.build(job)
        self.timeline.build_s += time.perf_counter() - t
        self.timeline.built = time.perf_counter()
        return built

    def back_step(self, job: BackStep) -> Stepped:
        raise NotImplementedError("split learning is not benchmarked here")

    def evaluate(self, job: EvaluateRound) -> Evaluation:
        return self.jobs.evaluate(job)

    def _event(self, event: Event) -> None:
        kind = type(event).__name__
        if kind == "Planned":
            self.timeline.planned = time.perf_counter()
        elif kind == "HopFinished":
            self.timeline.hops_done.append(time.perf_counter())
        elif kind in ("Finished", "Failed"):
            self.timeline.finished = time.perf_counter()
        if kind not in ("HopBegan", "HopMoved", "HopFinished", "Joined", "SaidBye"):
            self.events.append(event)  # a thousand agents' per-hop events: counted, not kept
        if self._on_event:
            self._on_event(event)

    def _agent(self, work: Path, name: str, index: int) -> AgentService:
        config = AgentConfig(name, "memory://", "-", cache_dir=work / name, calibrate=False,
                             map_large_allocations=False)  # fmt: skip
        will = (topics.agent_status(name), status_payload(name, "offline", 0.0), True)
        link = MemoryLink(self.broker, f"agent-{name}", [topics.agent_inbox(name)], will)
        trainers = FakeTrainers(record=False)
        return AgentService(config, local_data(100, index), link, trainers, MemoryModelCache(), self.clock,
                            InlineExecutor())  # fmt: skip

    # -- driving ---------------------------------------------------------------------------------------
    def run(self, limit_s: float = 36_000.0) -> None:
        """The trial to its end, then the agents' byes (``limit_s`` of simulated time at most)."""
        self.timeline.started = time.perf_counter()
        self.coordinator.start()
        for service in self.services.values():
            service.start()
        self._until(lambda: self.ctl.finished and not self.coordinator.busy, limit_s)
        deadline = self.coordinator.finish(exit_agents=True, bye_timeout_s=30.0)
        self._until(lambda: self.coordinator.byes_complete or self.clock.monotonic() > deadline, limit_s)
        self.timeline.closed = time.perf_counter()

    def _until(self, done: Callable[[], bool], limit_s: float) -> None:
        deadline, everyone = self.clock.now + limit_s, True
        while not done() and self.clock.now < deadline:
            if self._turn(everyone):
                everyone = False
                continue
            due = self.broker.next_due()
            self.clock.advance(max(0.05, min(0.5, due - self.clock.now)) if due is not None else 0.5)
            everyone = True  # timers

    def _turn(self, everyone: bool) -> bool:
        moved = self.coordinator.poll()
        ready = {client.removeprefix("agent-") for client in self.broker.ready()}
        names = self.services if everyone else self._moved | ready  # inline training: a trainer moved last turn
        self._moved = set()
        for name in sorted(names):
            service = self.services.get(name)
            if service is not None and service.exit_reason is None and service.link.connected and service.poll():
                self._moved.add(name)
        return moved or bool(self._moved)
