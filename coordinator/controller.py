"""The trial controller: messages and time in, messages and events out. Pure.

It waits for the expected agents, plans the route, assigns hops, serves
artifact bundles, seeds the first hop with the initial model, forwards models in
client-server mode, and notices the end (the final model arrives) or a failure
(join or hop timeout). ``TrialService`` wires it to MQTT and turns events into
progress, metrics and results.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import CoordinatorError
from coordinator.plan import Plan, PlanError
from coordinator.scheduler import HopSettings, artifact_kind, hop_tasks
from coordinator.strategy import ModelSend, SnakeStrategy, Strategy
from edge_agent.protocol import topics
from edge_agent.protocol.envelope import Envelope, decode, encode
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.messages import (
    ArtifactRequest,
    Assign,
    Bye,
    Hello,
    HopDone,
    HopProgress,
    HopStarted,
    HopTask,
    ModelRequest,
    Shutdown,
    Status,
    TransferAck,
    TransferNack,
    body_of,
    to_body,
)
from edge_agent.protocol.split import ACTIVATIONS, GRADIENTS
from edge_agent.protocol.transfer import Completed, Outbox, Outgoing, Reassembler, error_reply

log = logging.getLogger(__name__)
ME = topics.COORDINATOR


@dataclass(frozen=True)
class TrialSetup:
    trial_id: str
    expected_agents: int
    plan_for: Callable[[Mapping[str, Hello]], Plan]  # the agents' hellos -> plan (may raise PlanError)
    artifacts: dict[tuple[int, str], tuple[str, int]]  # (segment, kind "ort"|"portable") -> (sha256, size)
    blobs: dict[str, bytes]  # sha256 -> artifact bundle
    initial_model: bytes  # safetensors of every tensor
    settings: HopSettings
    chunk_bytes: int
    compression: str
    join_timeout_s: float
    hop_timeout_s: float
    strategy: Strategy = field(default_factory=SnakeStrategy)
    # builds the plan's segment bundles once the plan is known: plan -> (artifacts, blobs) as above
    build_artifacts: Callable[[Plan], tuple[dict[tuple[int, str], tuple[str, int]], dict[str, bytes]]] | None = None


@dataclass(frozen=True)
class Event:
    kind: str  # joined | planned | excluded | hop_started | hop_progress | hop_done | warning | bye | finished | failed
    agent: str = ""
    body: Any = None


@dataclass
class Step:
    out: list[Outgoing] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


class Controller:
    def __init__(self, setup: TrialSetup, now: float) -> None:
        self.setup = setup
        self.started_at = now
        self.outbox = Outbox(ME)
        self.inbound = Reassembler(ME)
        self.hellos: dict[str, Hello] = {}
        self.online: dict[str, bool] = {}
        self.plan: Plan | None = None
        self.tasks: dict[str, list[HopTask]] = {}
        self.artifacts, self.blobs = setup.artifacts, setup.blobs
        self.done_hops: dict[int, HopDone] = {}
        self.byes: dict[str, Bye] = {}
        self.last_progress = now
        self.final_model: bytes | None = None
        self.checkpoint_bytes = 0  # evaluation copies received (P2P), not part of the algorithm's traffic
        self.activation_bytes = 0  # split learning: activation payloads received
        self.gradient_bytes = 0  # split learning: gradient payloads sent
        self.failed: str | None = None
        self.seen: OrderedDict[str, None] = OrderedDict()

    @property
    def total_hops(self) -> int:
        return len(self.plan.hops) if self.plan else 0

    @property
    def finished(self) -> bool:
        return self.final_model is not None or self.failed is not None

    # -- entry points -------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, now: float) -> Step:
        """Any inbound publish. Never raises: bad input is logged, answered where possible, dropped."""
        parsed = topics.parse(topic)
        try:
            env = decode(payload)
        except ProtocolError as exc:
            log.warning("dropped %d-byte message on %s: %s", len(payload), topic, exc)
            return Step()
        try:
            if parsed is not None and parsed.kind == "status":
                return self._on_status(parsed.owner, env, now)
            return self._dispatch(env, now)
        except ProtocolError as exc:
            log.warning("refused %s %s from %s: %s", env.type, env.id, env.src, exc)
            return Step([error_reply(env, ME, exc.code, exc.message, now)] if env.src != ME else [])

    def tick(self, now: float) -> Step:
        step = Step(self.inbound.tick(now))
        resend, failed = self.outbox.tick(now)
        step.out.extend(resend)
        for p in failed:
            self._fail(step, f"{p.dst} never acknowledged {p.purpose} transfer {p.transfer_id}")
        if self.plan is None and now - self.started_at > self.setup.join_timeout_s:
            have = ", ".join(sorted(self.hellos)) or "none"
            self._fail(
                step, f"only {len(self.hellos)} of {self.setup.expected_agents} agents joined in time (joined: {have})"
            )
        elif self.plan is not None and not self.finished and now - self.last_progress > self.setup.hop_timeout_s:
            hop = self.plan.hops[min(len(self.done_hops), self.total_hops - 1)]
            state = "online" if self.online.get(hop.agent) else "offline"
            self._fail(
                step, f"no progress on hop {hop.hop} ({hop.agent}, {state}) for {self.setup.hop_timeout_s:.0f} s"
            )
        return step

    def shutdown(self, now: float, exit_agents: bool) -> list[Outgoing]:
        body = to_body(
            Shutdown("trial finished" if self.failed is None else f"trial failed: {self.failed}", exit_agents)
        )
        return [self._send(agent, "shutdown", body, now) for agent in sorted(set(self.tasks) | set(self.hellos))]

    # -- dispatch -----------------------------------------------------------------------------
    def _on_status(self, agent: str, env: Envelope, now: float) -> Step:
        state = body_of(Status, env.body).state
        was = self.online.get(agent)
        self.online[agent] = state == "online"
        step = Step()
        if was and state != "online" and agent in self.tasks and not self.finished:
            step.events.append(Event("warning", agent, f"{agent} went {state}"))
        return step

    def _dispatch(self, env: Envelope, now: float) -> Step:
        if env.dst != ME:
            raise ProtocolError("misrouted", f"message for {env.dst!r} reached the coordinator")
        if env.type == "chunk":
            return self._on_chunk(env, now)
        if env.id in self.seen:
            return Step()
        self.seen[env.id] = None
        while len(self.seen) > 8192:
            self.seen.popitem(last=False)
        if env.trial_id not in (None, self.setup.trial_id) and env.type != "hello":
            raise ProtocolError("wrong_trial", f"this coordinator runs trial {self.setup.trial_id!r}")
        if env.error is not None:
            step = Step(events=[Event("warning", env.src, f"{env.error.get('code')}: {env.error.get('message')}")])
            if env.error.get("code") in ("hop_failed", "resend_failed"):  # resend_failed: the model is lost
                self._fail(step, env.error.get("message", "a hop failed"))
            return step
        handlers: dict[str, Callable[[Envelope, float], Step]] = {
            "hello": self._on_hello,
            "artifact_request": self._on_artifact_request,
            "hop_started": lambda e, n: self._report(e, n, HopStarted, "hop_started"),
            "hop_progress": lambda e, n: self._report(e, n, HopProgress, "hop_progress"),
            "hop_done": self._on_hop_done,
            "bye": self._on_bye,
            "transfer_ack": self._on_ack,
            "model_request": self._on_model_request,
            "transfer_nack": lambda e, n: Step(self.outbox.on_nack(body_of(TransferNack, e.body), n)),
        }
        handler = handlers.get(env.type)
        if handler is None:
            raise ProtocolError("unknown_type", f"the coordinator does not handle {env.type!r} messages")
        return handler(env, now)

    def _on_hello(self, env: Envelope, now: float) -> Step:
        hello = body_of(Hello, env.body)
        if hello.agent_id != env.src:
            raise ProtocolError("malformed", f"hello from {env.src!r} names agent {hello.agent_id!r}")
        self.online[env.src] = True
        if self.plan is not None:
            if env.src in self.tasks:  # give it its hops again (assignments are idempotent)
                known = self.hellos.get(env.src)
                if known is not None and hello.instance and hello.instance == known.instance:
                    log.debug("%s repeated its hello before its assignment arrived; re-sending it", env.src)
                    return Step([self._assign(env.src, now)])
                log.info("%s said hello again from a new process; re-sending its assignment", env.src)
                self.hellos[env.src] = hello
                return Step([self._assign(env.src, now)], [Event("warning", env.src, "rejoined")])
            log.info("%s joined after the trial started; not part of this trial", env.src)
            return Step()
        self.hellos[env.src] = hello
        step = Step(events=[Event("joined", env.src, hello)])
        if len(self.hellos) >= self.setup.expected_agents:
            self._start(step, now)
        return step

    def _start(self, step: Step, now: float) -> None:
        agents = sorted(self.hellos)[: self.setup.expected_agents]
        try:
            self.plan = self.setup.plan_for({agent: self.hellos[agent] for agent in agents})
            if self.setup.build_artifacts is not None:
                self.artifacts, self.blobs = self.setup.build_artifacts(self.plan)
        except (PlanError, CoordinatorError) as exc:
            self._fail(step, f"cannot plan the trial: {exc}")
            return
        for agent, reason in self.plan.excluded:
            log.warning("%s left out of the plan: %s", agent, reason)
            step.events.append(Event("excluded", agent, reason))
        agents = sorted({h.agent for h in self.plan.hops})
        backends = {agent: self.hellos[agent].backend for agent in agents}
        unfit = [f"{a} ({b})" for a, b in backends.items() if (0, artifact_kind(b)) not in self.artifacts]
        if unfit:
            self._fail(step, f"{self.plan.algorithm} has no bundle for the backend of agent(s) {', '.join(unfit)}"
                       + ("; split learning needs the ort backend" if self.plan.algorithm == "split" else ""))  # fmt: skip
            return
        self.tasks = hop_tasks(self.plan, self.artifacts, self.setup.settings, backends)
        self.last_progress = now
        step.events.append(Event("planned", body=self.plan))
        step.out.extend(self._assign(agent, now) for agent in agents if agent in self.tasks)
        samples = {agent: self.hellos[agent].num_train for agent in agents}
        self._send_models(step, self.setup.strategy.start(self.plan, self.setup.initial_model, samples), now)

    def _send_models(self, step: Step, sends: list[ModelSend], now: float) -> None:
        for s in sends:
            _, out = self.outbox.send(
                s.dst, self.setup.trial_id, s.purpose, s.meta, s.data, self.setup.chunk_bytes, now
            )
            step.out.extend(out)
            if s.purpose == GRADIENTS:
                self.gradient_bytes += len(s.data)

    def _assign(self, agent: str, now: float) -> Outgoing:
        assert self.plan is not None
        body = Assign(self.tasks[agent], self.setup.chunk_bytes, self.setup.compression, self.plan.groups())
        return self._send(agent, "assign", to_body(body), now)

    def _on_artifact_request(self, env: Envelope, now: float) -> Step:
        sha = body_of(ArtifactRequest, env.body).sha256
        blob = self.blobs.get(sha)
        if blob is None:
            raise ProtocolError("unknown_artifact", f"no artifact bundle {sha[:12]}")
        _, out = self.outbox.send(
            env.src, self.setup.trial_id, "artifact", {"sha256": sha}, blob, self.setup.chunk_bytes, now
        )
        return Step(out)

    def _report(self, env: Envelope, now: float, kind: type, name: str) -> Step:
        self.last_progress = now
        return Step(events=[Event(name, env.src, body_of(kind, env.body))])

    def _on_hop_done(self, env: Envelope, now: float) -> Step:
        done = body_of(HopDone, env.body)
        self.last_progress = now
        if done.hop in self.done_hops:
            return Step()
        self.done_hops[done.hop] = done
        return Step(events=[Event("hop_done", env.src, done)])

    def _on_bye(self, env: Envelope, now: float) -> Step:
        self.byes[env.src] = body_of(Bye, env.body)
        return Step(events=[Event("bye", env.src, self.byes[env.src])])

    def _on_model_request(self, env: Envelope, now: float) -> Step:
        request = body_of(ModelRequest, env.body)
        if self.plan is None:
            raise ProtocolError("unknown_hop", "no trial is running")
        log.info("%s asks for the whole model for hop %d: %s", env.src, request.hop, request.reason)
        step = Step()
        self._send_models(step, self.setup.strategy.on_request(self.plan, env.src, request.hop), now)
        return step

    def _on_ack(self, env: Envelope, now: float) -> Step:
        self.outbox.on_ack(body_of(TransferAck, env.body))
        return Step()

    def _on_chunk(self, env: Envelope, now: float) -> Step:
        done, out = self.inbound.add(env, now)
        step = Step(out)
        if done is not None:
            self.last_progress = now
            self._on_transfer(step, done, now)
        return step

    def _on_transfer(self, step: Step, done: Completed, now: float) -> None:
        if done.purpose == "checkpoint" and isinstance(done.meta.get("round"), int):
            self.checkpoint_bytes += len(done.data)
            step.events.append(Event("checkpoint", done.src, (done.meta["round"], done.data)))
            return
        on_batch = getattr(self.setup.strategy, "on_activations", None)
        if done.purpose == ACTIVATIONS and on_batch is not None and self.plan is not None:
            self.activation_bytes += len(done.data)
            self._send_models(step, on_batch(self.plan, done).sends, now)
            return
        if done.purpose != "model" or self.plan is None:
            log.warning("unexpected %s transfer %s from %s; dropped", done.purpose, done.transfer_id, done.src)
            return
        decision = self.setup.strategy.on_model(self.plan, done)
        self._send_models(step, decision.sends, now)
        if decision.request is not None:
            agent, hop, reason = decision.request
            step.out.append(self._send(agent, "model_request", to_body(ModelRequest(hop, reason)), now))
        if decision.checkpoint is not None:
            step.events.append(Event("checkpoint", done.src, decision.checkpoint))
        if decision.final is not None and self.final_model is None:
            self.final_model = decision.final
            step.events.append(Event("finished", done.src, decision.final))

    def _fail(self, step: Step, reason: str) -> None:
        if self.failed is None and self.final_model is None:
            self.failed = reason
            log.error("trial %s failed: %s", self.setup.trial_id, reason)
            step.events.append(Event("failed", body=reason))

    def _send(self, dst: str, kind: str, body: dict[str, Any], now: float) -> Outgoing:
        env = Envelope(kind, ME, dst, body, trial_id=self.setup.trial_id, created_at=now)
        return Outgoing(topics.inbox(dst), encode(env))
