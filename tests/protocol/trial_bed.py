"""A whole trial with the real services (``AgentService``, ``TrialService``) over the in-memory broker,
on a clock the bed advances: fake trainers and jobs, real controller, agent, transfers and hop runner.

Work runs inline (one thread) except split-learning fronts, whose worker waits for the coordinator's
gradients as on a device (a real worker thread). When nothing moves, the clock jumps to the next due
message or timer, so timeouts cost no real time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordinator.controller import Controller, TrialSetup
from coordinator.events import Event, RoundModel
from coordinator.plan import AgentProfile, GroupInfo, Plan
from coordinator.reroute import reroute
from coordinator.scheduler import HopSettings, fedavg_plan, snake_plan, split_plan
from coordinator.service import TrialService
from coordinator.split import SplitStrategy
from coordinator.strategy import FedAvgStrategy, SnakeStrategy, Strategy
from edge_agent.config import AgentConfig
from edge_agent.data import Images
from edge_agent.link import ManualClock
from edge_agent.localdata import LocalData
from edge_agent.memlink import MemoryBroker, MemoryLink, Tamper
from edge_agent.protocol import topics
from edge_agent.protocol.codec import decode_tensors, encode_tensors
from edge_agent.protocol.envelope import Envelope, decode
from edge_agent.protocol.messages import Hello
from edge_agent.service import AgentService, status_payload
from tools.fakes import CountingBack, FakeJobs, FakeTrainers, InlineExecutor, MemoryModelCache, Trained

GROUPS = [GroupInfo(f"g{i}", (f"g{i}.w",), (f"g{i}.stat",), 10 * (i + 1)) for i in range(4)]
SIZE = 1024  # floats per tensor: parameters dominate the bytes, as in a real model


def hello(agent_id: str) -> Hello:
    return Hello(agent_id, "fake", {}, "x86_64", "Linux", "3.11", 2, 1024, 512, 100, 10, 10, [1, 28, 28], [10] * 10)


def local_data(samples: int) -> LocalData:
    rng = np.random.default_rng(samples)
    x = rng.integers(0, 255, (samples, 1, 2, 2), dtype=np.uint8)
    y = rng.integers(0, 10, samples)
    return LocalData(Images(x), y, Images(x[:2]), y[:2], 10)


@dataclass
class TrialBed:
    tmp: Path
    agents: int = 3
    rounds: int = 2
    mode: str = "p2p"
    algorithm: str = "snake"
    checkpoints: bool = False
    backends: tuple[str, ...] = ("fake",)
    compression: str = "none"
    samples: tuple[int, ...] = (100,)
    hop_timeout_s: float = 900.0  # the trial file default
    chunk_bytes: int = 1 << 16
    tamper: Tamper | None = None
    tolerant: bool = False  # snake: route around lost agents (TrialSetup.reroute)
    clock: ManualClock = field(default_factory=ManualClock)
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.broker = MemoryBroker(self.clock, self.tamper)
        self.initial = {
            name: np.full(SIZE if name.endswith(".w") else 2, i, np.float32)
            for i, g in enumerate(GROUPS)
            for name in (*g.params, *g.buffers)
        }
        self.back = CountingBack(GROUPS[1:])
        self.jobs = FakeJobs(GROUPS, {k: v.shape for k, v in self.initial.items()}, self.back)
        self.coordinator = self.coordinator_service()
        self.log: list[Trained] = []  # every training run, in order
        self.losses: list[float] = []  # split learning: the coordinator's loss per batch, as agents got it
        self.trainers = {
            f"a{i}": FakeTrainers(self.backends[i % len(self.backends)], self.log, self.losses)
            for i in range(self.agents)
        }
        self.caches = {name: MemoryModelCache() for name in self.trainers}
        self.services = {name: self.agent(name, i) for i, name in enumerate(self.trainers)}

    def coordinator_service(self, resume_from: object = None) -> TrialService:
        """The coordinator (a persistent session, as deployed); ``resume_from``: a journal to carry on from."""
        link = MemoryLink(self.broker, "coordinator", [topics.coordinator_inbox(), topics.ALL_AGENT_STATUS])
        return TrialService(link, self.setup(), self.jobs, self.events.append, self.clock, InlineExecutor(),
                            resume_from=resume_from)  # type: ignore[arg-type]  # fmt: skip

    def setup(self) -> TrialSetup:
        plans = {
            "fedavg": lambda hellos: fedavg_plan(sorted(hellos), GROUPS, self.rounds),
            "split": lambda hellos: split_plan(sorted(hellos), GROUPS, self.rounds, "g0"),
            "snake": lambda hellos: snake_plan(sorted(hellos), GROUPS, self.rounds, self.mode),
        }
        strategies: dict[str, Strategy] = {
            "fedavg": FedAvgStrategy(self.compression),
            "split": SplitStrategy(self.back, self.compression),
            "snake": SnakeStrategy(self.compression),
        }

        def again(plan: Plan, original: Plan, start: int, hellos: Mapping[str, Hello]) -> Plan:
            return reroute(plan, original, start, [AgentProfile(a) for a in sorted(hellos)], GROUPS, 8)

        return TrialSetup(
            "t1", self.agents, plans[self.algorithm], encode_tensors(self.initial),
            HopSettings(1, 8, 0.1, 0, None, self.checkpoints), self.chunk_bytes, self.compression, 60.0,
            self.hop_timeout_s, strategies[self.algorithm], again if self.tolerant else None,
        )  # fmt: skip

    def agent(self, name: str, index: int) -> AgentService:
        config = AgentConfig(
            name, "memory://", "-", cache_dir=self.tmp / name, calibrate=False, map_large_allocations=False
        )
        will = (topics.agent_status(name), status_payload(name, "offline", 0.0), True)
        link = MemoryLink(self.broker, f"agent-{name}", [topics.agent_inbox(name)], will)
        executor: Executor = ThreadPoolExecutor(1) if self.algorithm == "split" else InlineExecutor()
        data = local_data(self.samples[index % len(self.samples)])
        return AgentService(config, data, link, self.trainers[name], self.caches[name], self.clock, executor)

    # -- running ----------------------------------------------------------------------------------
    @property
    def ctl(self) -> Controller:
        return self.coordinator.controller

    def run(self, limit_s: float = 3600.0, until: Callable[[], bool] | None = None) -> None:
        """Run until the trial ends (or ``until``), or ``limit_s`` of simulated time passes."""
        done = until or (lambda: self.ctl.finished and not self.coordinator.busy)
        if not self.coordinator.link.connected:
            self.coordinator.start()
            for service in self.services.values():
                service.start()
        deadline = self.clock.now + limit_s
        while not done() and self.clock.now < deadline:
            if self._turn():
                continue
            if any(s.training for s in self.live()) or self.coordinator.busy:
                time.sleep(0.001)  # a worker thread (split front) is at work
                continue
            due = self.broker.next_due()
            self.clock.advance(max(0.05, min(0.5, due - self.clock.now)) if due is not None else 0.5)

    def crash(self, name: str) -> None:
        """The agent process dies (SIGKILL): no goodbye; the broker publishes its last will."""
        self.services[name].link.crash()  # type: ignore[attr-defined]

    def restart(self, name: str) -> AgentService:
        """A new process of the agent: same id, same disk (cache, artifacts), a fresh memory."""
        self.crash(name) if self.services[name].link.connected else None
        service = self.agent(name, sorted(self.services).index(name))
        self.services[name] = service
        service.start()
        return service

    def live(self) -> list[AgentService]:
        return [s for s in self.services.values() if s.exit_reason is None and s.link.connected]

    def _turn(self) -> bool:
        moved = self.coordinator.poll()
        for service in self.live():
            moved |= service.poll()
        return moved

    def finish(self) -> None:
        """The shutdown after a trial: agents say bye (and exit)."""
        deadline = self.coordinator.finish(exit_agents=True, bye_timeout_s=30.0)
        self.run(until=lambda: self.coordinator.byes_complete or self.clock.monotonic() > deadline)

    # -- what happened ----------------------------------------------------------------------------
    @property
    def final(self) -> dict[str, np.ndarray]:
        assert self.ctl.final_model is not None, self.ctl.failed
        return decode_tensors(self.ctl.final_model)

    def round_models(self) -> list[int]:
        return [e.round for e in self.events if isinstance(e, RoundModel)]

    def sent(self, kind: str) -> list[Envelope]:
        """Every control message of ``kind`` published (JSON envelopes)."""
        return [e for _, p in self.broker.published if p[:1] == b"{" and (e := decode(p)).type == kind]

    def frames(self, purpose: str) -> list[Envelope]:
        """Every chunk frame of transfers with ``purpose`` published (resends included)."""
        return [e for _, p in self.broker.published if p[:4] == b"SNK1" and (e := decode(p)).body["purpose"] == purpose]

    def model_transfers(self) -> list[tuple[str, dict, int]]:  # type: ignore[type-arg]
        """(receiver, meta, payload size) of every model transfer, in order (first chunk of each)."""
        seen, out = set(), []
        for env in self.frames("model"):
            if env.body["transfer_id"] not in seen:
                seen.add(env.body["transfer_id"])
                out.append((env.dst, env.body["meta"], env.body["size"]))
        return out
