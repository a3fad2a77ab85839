"""The trial controller: messages, job results and time in; messages, events and jobs out. Pure.

It waits for the expected agents, plans the route, has the plan's artifacts built (a job), assigns
hops, serves artifact bundles, seeds the first hop with the initial model, forwards models in
client-server mode, has every round's model evaluated (a job), and notices the end (the final model
arrives) or a failure (join or hop timeout, a transfer nobody acknowledges). ``TrialService`` wires it
to a ``Link`` and runs its jobs; the display and the run record consume its events.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import CoordinatorError
from coordinator.events import (
    BackStep,
    BuildArtifacts,
    Built,
    EvaluateRound,
    Evaluation,
    Event,
    Excluded,
    Failed,
    Finished,
    HopBegan,
    HopFinished,
    HopMoved,
    Job,
    Joined,
    Planned,
    RoundEvaluated,
    RoundModel,
    SaidBye,
    Stepped,
    Warned,
)
from coordinator.plan import Plan, PlanError
from coordinator.scheduler import HopSettings, artifact_kind, hop_tasks
from coordinator.strategy import Decision, ModelSend, SnakeStrategy, Strategy
from edge_agent.protocol import topics
from edge_agent.protocol.envelope import Envelope, encode
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.guard import Guard, Rejections
from edge_agent.protocol.kinds import MessageType, Purpose
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
from edge_agent.protocol.transfer import Completed, Outbox, Outgoing, Reassembler, error_message

log = logging.getLogger(__name__)
ME = topics.COORDINATOR
Handler = Callable[[Envelope, float], "Step"]


@dataclass(frozen=True)
class TrialSetup:
    trial_id: str
    expected_agents: int
    plan_for: Callable[[Mapping[str, Hello]], Plan]  # the agents' hellos -> plan (may raise PlanError)
    initial_model: bytes  # safetensors of every tensor
    settings: HopSettings
    chunk_bytes: int
    compression: str
    join_timeout_s: float
    hop_timeout_s: float
    strategy: Strategy = field(default_factory=SnakeStrategy)


@dataclass
class Step:
    out: list[Outgoing] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)


class Controller:
    def __init__(self, setup: TrialSetup, now: float) -> None:
        self.setup = setup
        self.started_at = now
        self.outbox = Outbox(ME)
        self.hellos: dict[str, Hello] = {}
        self.online: dict[str, bool] = {}
        self.plan: Plan | None = None
        self.tasks: dict[str, list[HopTask]] = {}
        self.artifacts: dict[tuple[int, str], tuple[str, int]] = {}
        self.blobs: dict[str, bytes] = {}
        self.done_hops: dict[int, HopDone] = {}
        self.hop_started_at: dict[int, float] = {}
        self.byes: dict[str, Bye] = {}
        self.last_progress = now
        self.final_model: bytes | None = None
        self.bytes_sent = 0  # every payload this controller published
        self.checkpoint_bytes = 0  # evaluation copies received (P2P), not part of the algorithm's traffic
        self.activation_bytes = 0  # split learning: activation payloads received
        self.gradient_bytes = 0  # split learning: gradient payloads sent
        self.evaluated: set[int] = set()  # rounds whose model went to evaluation
        self.failed: str | None = None
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.guard = Guard(ME)
        self.inbound = Reassembler(ME, rejections=self.guard.rejections)

    @property
    def total_hops(self) -> int:
        return len(self.plan.hops) if self.plan else 0

    @property
    def finished(self) -> bool:
        return self.final_model is not None or self.failed is not None

    # -- entry points -------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, now: float) -> Step:
        """Any inbound publish. Never raises: bad input is logged, counted (``rejections``), answered, dropped."""
        parsed = topics.parse(topic)

        def dispatch(env: Envelope) -> Step:
            if parsed is not None and parsed.kind == "status":
                return self._on_status(parsed.owner, env, now)
            return self._dispatch(env, now)

        return self._counted(self.guard.receive(topic, payload, now, dispatch, Step))

    @property
    def rejections(self) -> Rejections:
        return self.guard.rejections

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
        elif self.tasks and not self.finished and now - self.last_progress > self.setup.hop_timeout_s:
            hop = self.plan.hops[min(len(self.done_hops), self.total_hops - 1)] if self.plan else None
            assert hop is not None
            state = "online" if self.online.get(hop.agent) else "offline"
            self._fail(
                step, f"no progress on hop {hop.hop} ({hop.agent}, {state}) for {self.setup.hop_timeout_s:.0f} s"
            )
        return self._counted(step)

    def job_done(self, job: Job, result: object, now: float) -> Step:
        """The shell finished ``job``: ``result`` is its value, or the exception it raised."""
        step = Step()
        if isinstance(job, BuildArtifacts):
            if isinstance(result, Built):
                self.artifacts, self.blobs = result.artifacts, result.blobs
                self._assign_all(step, now)
            else:
                self._fail(step, f"cannot build the plan's artifacts: {result}")
        elif isinstance(job, BackStep):
            if isinstance(result, Stepped) and self.plan is not None:
                self._decide(step, self.setup.strategy.on_stepped(self.plan, job, result), job.src, now)
            else:
                reason = f"batch {job.seq} of hop {job.hop} does not fit the back: {result}"
                log.warning("%s (from %s)", reason, job.src)
                step.out.append(self._error(job.src, "malformed", reason, now))
        elif isinstance(result, Evaluation):
            step.events.append(RoundEvaluated(job.round, result.accuracy, result.loss, job.bytes_so_far))
        else:
            self._fail(step, f"evaluating round {job.round} failed: {result}")
        return self._counted(step)

    def shutdown(self, now: float, exit_agents: bool) -> list[Outgoing]:
        body = to_body(
            Shutdown("trial finished" if self.failed is None else f"trial failed: {self.failed}", exit_agents)
        )
        agents = sorted(set(self.tasks) | set(self.hellos))
        return self._counted(Step([self._send(a, MessageType.SHUTDOWN, body, now) for a in agents])).out

    def _counted(self, step: Step) -> Step:
        self.bytes_sent += sum(len(o.payload) for o in step.out)
        return step

    # -- dispatch -----------------------------------------------------------------------------
    def _on_status(self, agent: str, env: Envelope, now: float) -> Step:
        if env.type != MessageType.STATUS or env.src != agent:
            raise ProtocolError("malformed", f"{env.type} from {env.src} on the status topic of {agent}")
        state = body_of(Status, env.body).state
        if state not in ("online", "offline"):
            raise ProtocolError("malformed", f"status of {agent} is neither online nor offline")
        was = self.online.get(agent)
        self.online[agent] = state == "online"
        step = Step()
        if was and state != "online" and agent in self.tasks and not self.finished:
            step.events.append(Warned(agent, f"{agent} went {state}"))
        return step

    def _dispatch(self, env: Envelope, now: float) -> Step:
        if env.dst != ME:
            raise ProtocolError("misrouted", f"message for {env.dst!r} reached the coordinator")
        if env.type == MessageType.CHUNK:
            return self._on_chunk(env, now)
        if env.id in self.seen:
            return Step()
        self.seen[env.id] = None
        while len(self.seen) > 8192:
            self.seen.popitem(last=False)
        if env.trial_id not in (None, self.setup.trial_id) and env.type != MessageType.HELLO:
            raise ProtocolError("wrong_trial", f"this coordinator runs trial {self.setup.trial_id!r}")
        if env.error is not None:
            return self._on_error(env)
        handler = self._handlers().get(env.type)
        if handler is None:
            raise ProtocolError("unknown_type", f"the coordinator does not handle {env.type!r} messages")
        return handler(env, now)

    def _handlers(self) -> dict[str, Handler]:
        return {
            MessageType.HELLO: self._on_hello,
            MessageType.ARTIFACT_REQUEST: self._on_artifact_request,
            MessageType.HOP_STARTED: self._on_hop_started,
            MessageType.HOP_PROGRESS: self._on_hop_progress,
            MessageType.HOP_DONE: self._on_hop_done,
            MessageType.BYE: self._on_bye,
            MessageType.TRANSFER_ACK: self._on_ack,
            MessageType.MODEL_REQUEST: self._on_model_request,
            MessageType.TRANSFER_NACK: lambda e, n: Step(self.outbox.on_nack(body_of(TransferNack, e.body), n)),
        }

    def _on_error(self, env: Envelope) -> Step:
        error = env.error or {}
        code, message = str(error.get("code")), str(error.get("message"))
        step = Step(events=[Warned(env.src, f"{code}: {message}")])
        # hop_failed: training raised; resend_failed: the model is lost; peer_unreachable: a hand-off never
        # got through (the sender keeps it); the trial cannot go on without that hop
        if code in ("hop_failed", "resend_failed", "peer_unreachable"):
            self._fail(step, message if code != "peer_unreachable" else f"{env.src}: {message}")
        return step

    def _on_hello(self, env: Envelope, now: float) -> Step:
        hello = body_of(Hello, env.body)
        if hello.agent_id != env.src:
            raise ProtocolError("malformed", f"hello from {env.src!r} names agent {hello.agent_id!r}")
        self.online[env.src] = True
        if self.plan is not None:
            return self._on_late_hello(env.src, hello, now)
        self.hellos[env.src] = hello
        step = Step(events=[Joined(env.src, hello)])
        if len(self.hellos) >= self.setup.expected_agents:
            self._plan(step)
        return step

    def _on_late_hello(self, agent: str, hello: Hello, now: float) -> Step:
        if agent not in self.tasks:
            if agent in self.hellos:  # planned, its assignment waits for the artifacts
                return Step()
            log.info("%s joined after the trial started; not part of this trial", agent)
            return Step()
        known = self.hellos.get(agent)
        if known is not None and hello.instance and hello.instance == known.instance:
            log.debug("%s repeated its hello before its assignment arrived; re-sending it", agent)
            return Step([self._assign(agent, now)])
        log.info("%s said hello again from a new process; re-sending its assignment", agent)
        self.hellos[agent] = hello
        return Step([self._assign(agent, now)], [Warned(agent, "rejoined")])

    def _plan(self, step: Step) -> None:
        agents = sorted(self.hellos)[: self.setup.expected_agents]
        try:
            self.plan = self.setup.plan_for({agent: self.hellos[agent] for agent in agents})
        except (PlanError, CoordinatorError) as exc:
            self._fail(step, f"cannot plan the trial: {exc}")
            return
        for agent, reason in self.plan.excluded:
            log.warning("%s left out of the plan: %s", agent, reason)
            step.events.append(Excluded(agent, reason))
        step.events.append(Planned(self.plan))
        step.jobs.append(BuildArtifacts(self.plan))

    def _assign_all(self, step: Step, now: float) -> None:
        """The artifacts are built: assign every hop and send the first model(s)."""
        assert self.plan is not None
        agents = sorted({h.agent for h in self.plan.hops})
        backends = {agent: self.hellos[agent].backend for agent in agents}
        unfit = [f"{a} ({b})" for a, b in backends.items() if (0, artifact_kind(b)) not in self.artifacts]
        if unfit:
            self._fail(step, f"{self.plan.algorithm} has no bundle for the backend of agent(s) {', '.join(unfit)}"
                       + ("; split learning needs the ort backend" if self.plan.algorithm == "split" else ""))  # fmt: skip
            return
        self.tasks = hop_tasks(self.plan, self.artifacts, self.setup.settings, backends)
        self.last_progress = now
        step.out.extend(self._assign(agent, now) for agent in agents if agent in self.tasks)
        samples = {agent: self.hellos[agent].num_train for agent in agents}
        self._send_models(step, self.setup.strategy.start(self.plan, self.setup.initial_model, samples), now)

    def _send_models(self, step: Step, sends: list[ModelSend], now: float) -> None:
        for s in sends:
            _, out = self.outbox.send(
                s.dst, self.setup.trial_id, s.purpose, s.meta, s.data, self.setup.chunk_bytes, now
            )
            step.out.extend(out)
            if s.purpose == Purpose.GRADIENTS:
                self.gradient_bytes += len(s.data)

    def _assign(self, agent: str, now: float) -> Outgoing:
        assert self.plan is not None
        body = Assign(self.tasks[agent], self.setup.chunk_bytes, self.setup.compression, self.plan.groups())
        return self._send(agent, MessageType.ASSIGN, to_body(body), now)

    def _on_artifact_request(self, env: Envelope, now: float) -> Step:
        sha = body_of(ArtifactRequest, env.body).sha256
        blob = self.blobs.get(sha)
        if blob is None:
            raise ProtocolError("unknown_artifact", f"no artifact bundle {sha[:12]}")
        _, out = self.outbox.send(
            env.src, self.setup.trial_id, Purpose.ARTIFACT, {"sha256": sha}, blob, self.setup.chunk_bytes, now
        )
        return Step(out)

    def _on_hop_started(self, env: Envelope, now: float) -> Step:
        report = body_of(HopStarted, env.body)
        self.last_progress = now
        self.hop_started_at.setdefault(report.hop, now)
        return Step(events=[HopBegan(env.src, report)])

    def _on_hop_progress(self, env: Envelope, now: float) -> Step:
        self.last_progress = now
        return Step(events=[HopMoved(env.src, body_of(HopProgress, env.body))])

    def _on_hop_done(self, env: Envelope, now: float) -> Step:
        done = body_of(HopDone, env.body)
        self.last_progress = now
        if done.hop in self.done_hops:
            return Step()
        self.done_hops[done.hop] = done
        return Step(events=[HopFinished(env.src, done, now - self.hop_started_at.get(done.hop, now))])

    def _on_bye(self, env: Envelope, now: float) -> Step:
        self.byes[env.src] = body_of(Bye, env.body)
        return Step(events=[SaidBye(env.src, self.byes[env.src])])

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
        if done.purpose == Purpose.CHECKPOINT and isinstance(done.meta.get("round"), int):
            self.checkpoint_bytes += len(done.data)
            self._round_model(step, done.meta["round"], bytes(done.data))
            return
        if self.plan is None or done.purpose not in (Purpose.MODEL, Purpose.ACTIVATIONS):
            log.warning("unexpected %s transfer %s from %s; dropped", done.purpose, done.transfer_id, done.src)
            return
        if done.purpose == Purpose.ACTIVATIONS:
            self.activation_bytes += len(done.data)
            self._decide(step, self.setup.strategy.on_activations(self.plan, done), done.src, now)
            return
        decision = self.setup.strategy.on_model(self.plan, done)
        self._decide(step, decision, done.src, now)
        if decision.final is not None and self.final_model is None:
            self.final_model = decision.final
            step.events.append(Finished(done.src, decision.final))

    def _decide(self, step: Step, decision: Decision, src: str, now: float) -> None:
        """Carry out what the strategy decided (the final model is the caller's business)."""
        self._send_models(step, decision.sends, now)
        if decision.request is not None:
            agent, hop, reason = decision.request
            step.out.append(self._send(agent, MessageType.MODEL_REQUEST, to_body(ModelRequest(hop, reason)), now))
        if decision.checkpoint is not None:
            self._round_model(step, *decision.checkpoint)
        step.jobs.extend(decision.jobs)

    def _round_model(self, step: Step, round_: int, model: bytes) -> None:
        """A round's whole model: an event, and its evaluation as a job (once per round)."""
        if round_ in self.evaluated:
            return
        self.evaluated.add(round_)
        # what the algorithm moved so far: everything the coordinator sent + the model each hop handed on
        # (+ split learning's activations, which agents send batch by batch); this step's sends excluded
        moved = self.bytes_sent + sum(d.model_bytes for d in self.done_hops.values()) + self.activation_bytes
        step.events.append(RoundModel(round_, model))
        step.jobs.append(EvaluateRound(round_, model, moved))

    def _fail(self, step: Step, reason: str) -> None:
        if self.failed is None and self.final_model is None:
            self.failed = reason
            log.error("trial %s failed: %s", self.setup.trial_id, reason)
            step.events.append(Failed(reason))

    def _send(self, dst: str, kind: MessageType, body: dict[str, Any], now: float) -> Outgoing:
        env = Envelope(kind, ME, dst, body, trial_id=self.setup.trial_id, created_at=now)
        return Outgoing(topics.inbox(dst), encode(env))

    def _error(self, dst: str, code: str, message: str, now: float) -> Outgoing:
        return error_message(ME, dst, self.setup.trial_id, code, message, now)
