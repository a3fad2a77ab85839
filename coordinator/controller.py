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
    Fault,
    Finished,
    HopBegan,
    HopFinished,
    HopMoved,
    Job,
    Joined,
    Planned,
    Relayed,
    Replanned,
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
    HandOff,
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
SETTLE_S = 20.0  # after our own link was down: agents reconnect (backoff up to 8 s) before anyone is called lost


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
    hop_timeout_s: float  # no progress for this long (plus the hop's own estimate): its agent is taken as hung
    strategy: Strategy = field(default_factory=SnakeStrategy)
    # fault tolerance (snake): (plan, original plan, first hop to change, available agents' hellos) -> plan.
    # None: a lost agent fails the trial.
    reroute: Callable[[Plan, Plan, int, Mapping[str, Hello]], Plan] | None = None
    offline_grace_s: float = 15.0  # an agent whose last will says offline is lost after this long (> reconnect)
    holder_grace_s: float = 60.0  # ...unless it holds the only copy of a finished hop: then wait this long
    silence_s: float = 30.0  # an agent that sent heartbeats and then nothing for this long is lost
    min_throughput_bps: float = 125_000.0  # a hop's deadline allows its model to travel at 1 Mbit/s
    max_reroutes: int = 0  # 0: three per agent


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
        # snake hops whose report never came (lost with a broker's queue) but a later hop's did: that later
        # hop started from their output, so they finished; they are not trained again
        self.unreported: set[int] = set()
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
        self.handlers = self._handlers()
        # fault tolerance
        self.original: Plan | None = None  # the plan as first made (a returning agent gets its hops back)
        self.lost: dict[str, str] = {}  # agent -> why it is out of the trial
        self.last_heard: dict[str, float] = {}
        self.heartbeating: set[str] = set()
        self.offline_since: dict[str, float] = {}
        self.no_copy: set[tuple[str, int]] = set()  # (agent, hop): it cannot hand that hop's output on
        self.hops_retried = 0  # hops trained again after a fault
        self.hops_lost = 0  # finished hops whose output was lost with its agent (trained again)
        self.reroutes = 0
        self.link_down_at = float("-inf")
        self.resumed = False  # started again from a journal
        self.held: tuple[int, bytes] | None = None  # client-server, resumed: the model the coordinator held
        self.restarted_meanwhile: set[str] = set()  # resumed: agents that said hello from a new process meanwhile
        self.nudged: set[int] = set()  # hops whose starting model was sent again for want of news
        self.bytes_retransmitted = 0  # sent again: resent chunks and transfers, models re-sent after a fault
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
            if env.dst == ME and env.trial_id == self.setup.trial_id:
                self.last_heard[env.src] = now
                # news from the agent itself outweighs an "offline" status: a stale will or a replay of one
                self.offline_since.pop(env.src, None)
            return self._dispatch(env, now)

        return self._counted(self.guard.receive(topic, payload, now, dispatch, Step))

    @property
    def rejections(self) -> Rejections:
        return self.guard.rejections

    def tick(self, now: float) -> Step:
        step = Step(self.inbound.tick(now))
        resend, failed = self.outbox.tick(now)
        step.out.extend(resend)
        self.bytes_retransmitted += sum(o.size for o in resend)
        for p in failed:
            reason = f"{p.dst} never acknowledged {p.purpose} transfer {p.transfer_id}"
            if p.dst in self.lost:
                continue
            if self._tolerant:
                self._lose(step, p.dst, reason, now)
            else:
                self._fail(step, reason)
        if self._tolerant and self.tasks and not self.finished:
            self._watch(step, now)
            return self._counted(step)
        if self.plan is None and now - self.started_at > self.setup.join_timeout_s:
            have = ", ".join(sorted(self.hellos)) or "none"
            self._fail(
                step, f"only {len(self.hellos)} of {self.setup.expected_agents} agents joined in time (joined: {have})"
            )
        elif self.tasks and not self.finished and now - self.last_progress > self.setup.hop_timeout_s:
            k = self._current() if self.plan else None
            hop = self.plan.hops[k if k is not None else self.total_hops - 1] if self.plan else None
            assert hop is not None
            state = "online" if self.online.get(hop.agent) else "offline"
            self._fail(
                step, f"no progress on hop {hop.hop} ({hop.agent}, {state}) for {self.setup.hop_timeout_s:.0f} s"
            )
        return self._counted(step)

    def resume(
        self, events: list[Event], counters: Mapping[str, int], held: tuple[int, bytes] | None, now: float
    ) -> Step:
        """A coordinator started again on a trial's journal: rebuild what the events say (who joined, the
        plan and its re-plans, finished hops, lost agents, evaluated rounds), then have the plan's artifacts
        built (cached by content) and carry on from the first unfinished hop (``job_done``)."""
        for event in events:
            if isinstance(event, Joined):
                self.hellos[event.agent] = event.hello
            elif isinstance(event, Planned):
                self.plan = self.original = event.plan
            elif isinstance(event, Replanned):
                self.plan = event.plan
                self.done_hops = {h: d for h, d in self.done_hops.items() if h < event.start}
                self.unreported = {h for h in self.unreported if h < event.start}
            elif isinstance(event, HopFinished):
                self._finish(event.report)
            elif isinstance(event, Fault) and event.kind == "agent_lost":
                self.lost[event.agent] = event.detail
            elif isinstance(event, Fault) and event.kind == "agent_returned":
                self.lost.pop(event.agent, None)
            elif isinstance(event, RoundEvaluated):
                self.evaluated.add(event.round)
        if self.plan is None:
            raise CoordinatorError("the journal holds no plan: the trial never started; run it again")
        if self.plan.algorithm != "snake":
            raise CoordinatorError(f"only snake trials resume; this one is {self.plan.algorithm}")
        for key in ("hops_retried", "hops_lost", "reroutes", "bytes_retransmitted", "checkpoint_bytes"):
            setattr(self, key, int(counters.get(key, 0)))
        self.resumed, self.held = True, held
        self.last_progress = now
        done = ", ".join(map(str, sorted(self.done_hops))) or "none"
        log.info("resuming trial %s: %d of %d hops done (%s)", self.setup.trial_id,
                 len(self.done_hops) + len(self.unreported), self.total_hops, done)  # fmt: skip
        return Step(jobs=[BuildArtifacts(self.plan)])

    def counters(self) -> dict[str, int]:
        """What a journal keeps besides events (a resumed coordinator carries on counting)."""
        keys = ("hops_retried", "hops_lost", "reroutes", "bytes_retransmitted", "checkpoint_bytes")
        return {key: int(getattr(self, key)) for key in keys}

    def link_down(self, now: float) -> None:
        """Our broker link is down: nobody is late meanwhile (messages wait in the broker); the fault
        detectors start again ``SETTLE_S`` after the link is back, once the agents have reconnected."""
        self.outbox.postpone(now)
        self.inbound.postpone(now)
        self.last_progress = max(self.last_progress, now)
        self.link_down_at = now

    def job_done(self, job: Job, result: object, now: float) -> Step:
        """The shell finished ``job``: ``result`` is its value, or the exception it raised."""
        step = Step()
        if isinstance(job, BuildArtifacts):
            if isinstance(result, Built):
                self.artifacts, self.blobs = result.artifacts, result.blobs
                if self.resumed:
                    self._carry_on(step, now)
                else:
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
        reason = "trial finished" if self.failed is None else f"trial failed: {self.failed}"
        agents = sorted(set(self.tasks) | set(self.hellos))
        out = []
        for agent in agents:
            hello = self.hellos.get(agent)
            instance = hello.instance if hello is not None and agent not in self.tasks else ""
            out.append(self._send(agent, MessageType.SHUTDOWN, to_body(Shutdown(reason, exit_agents, instance)), now))
        return self._counted(Step(out)).out

    def _counted(self, step: Step) -> Step:
        self.bytes_sent += sum(o.size for o in step.out)
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
        if state == "online":
            self.offline_since.pop(agent, None)
            if agent in self.lost and self._tolerant and agent in self.hellos and not self.finished:
                self._readmit(step, agent, "is online again", now)  # the same process, its link back
        else:
            self.offline_since.setdefault(agent, now)
        if was and state != "online" and agent in self.tasks and not self.finished:
            step.events.append(Warned(agent, f"{agent} went {state}"))
        return step

    def _dispatch(self, env: Envelope, now: float) -> Step:
        if env.dst != ME:
            raise ProtocolError("misrouted", f"message for {env.dst!r} reached the coordinator")
        if env.trial_id not in (None, self.setup.trial_id) and env.type != MessageType.HELLO:
            raise ProtocolError("wrong_trial", f"this coordinator runs trial {self.setup.trial_id!r}")
        if env.type == MessageType.CHUNK:
            return self._on_chunk(env, now)
        if env.id in self.seen:
            return Step()
        self.seen[env.id] = None
        while len(self.seen) > 8192:
            self.seen.popitem(last=False)
        if env.error is not None:
            return self._on_error(env, now)
        handler = self.handlers.get(env.type)
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
            MessageType.HEARTBEAT: self._on_heartbeat,
            MessageType.TRANSFER_ACK: self._on_ack,
            MessageType.MODEL_REQUEST: self._on_model_request,
            MessageType.TRANSFER_NACK: self._on_nack,
        }

    def _on_error(self, env: Envelope, now: float) -> Step:
        error = env.error or {}
        code, message = str(error.get("code")), str(error.get("message"))
        step = Step(events=[Warned(env.src, f"{code}: {message}")])
        # hop_failed: training raised; resend_failed: the model is lost; peer_unreachable: a hand-off never
        # got through (the sender keeps it). Without fault tolerance the trial cannot go on without that hop.
        if not self._tolerant:
            if code in ("hop_failed", "resend_failed", "peer_unreachable"):
                self._fail(step, message if code != "peer_unreachable" else f"{env.src}: {message}")
            return step
        if code == "hop_failed" and env.src not in self.lost:
            self._lose(step, env.src, message, now)  # it cannot train its hop (memory, a broken runtime)
        elif code == "resend_failed" and self.plan is not None:
            k = self._current()
            if k is not None and k > 0 and self.plan.hops[k - 1].agent == env.src:
                self.no_copy.add((env.src, k - 1))
                self._fault(step, "hand_off_failed", env.src, k, message, "retraining from an earlier copy", now)
                self._recover(step, now)
        # peer_unreachable: the receiver's loss is detected by its last will, silence or its hop's deadline
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
        if agent not in self.tasks and agent not in self.lost:
            if agent in self.hellos:  # planned, its assignment waits for the artifacts
                if self.resumed and hello.instance and hello.instance != self.hellos[agent].instance:
                    self.hellos[agent] = hello  # a new process while we were down: _carry_on treats it as one
                    self.restarted_meanwhile.add(agent)
                return Step()
            log.info("%s joined after the trial started; not part of this trial", agent)
            return Step()
        known = self.hellos.get(agent)
        if known is not None and hello.instance and hello.instance == known.instance:
            log.debug("%s repeated its hello before its assignment arrived; re-sending it", agent)
            return Step([self._assign(agent, now)])
        self.hellos[agent] = hello
        self.offline_since.pop(agent, None)
        if self._tolerant:
            return self._on_restart(agent, now)
        log.info("%s said hello again from a new process; re-sending its assignment", agent)
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
        self.original = self.plan
        self.last_progress = now
        step.out.extend(self._assign(agent, now) for agent in agents if agent in self.tasks)
        samples = {agent: self.hellos[agent].num_train for agent in agents}
        self._send_models(step, self.setup.strategy.start(self.plan, self.setup.initial_model, samples), now)

    def _carry_on(self, step: Step, now: float) -> None:
        """Resumed, artifacts ready: every available agent gets its hops from the first unfinished one on
        (one training keeps training: the tasks are the same); the starting model goes out again only when
        nothing is heard of that hop (``_watch``)."""
        assert self.plan is not None
        backends = {a: h.backend for a, h in self.hellos.items()}
        self.tasks = hop_tasks(self.plan, self.artifacts, self.setup.settings, backends)
        self.setup.strategy.resume(self.plan, self.setup.initial_model, self.held)  # type: ignore[attr-defined]
        k = self._current()
        if k is None:  # the last agent keeps sending the final model until we acknowledge it
            log.info("every hop is done; waiting for the final model")
            return
        for agent in sorted({h.agent for h in self.plan.hops} - set(self.lost)):
            step.out.append(self._assign(agent, now, replace_from=k))
        self.last_progress = now
        for agent in sorted(self.restarted_meanwhile - set(self.lost)):  # they lost what they held or trained
            restarted = self._on_restart(agent, now)
            step.out.extend(restarted.out)
            step.events.extend(restarted.events)
        self.restarted_meanwhile.clear()

    def _send_models(self, step: Step, sends: list[ModelSend], now: float) -> None:
        for s in sends:
            _, out = self.outbox.send(
                s.dst, self.setup.trial_id, s.purpose, s.meta, s.data, self.setup.chunk_bytes, now
            )
            step.out.extend(out)
            if s.purpose == Purpose.GRADIENTS:
                self.gradient_bytes += len(s.data)

    def _assign(self, agent: str, now: float, replace_from: int | None = None) -> Outgoing:
        assert self.plan is not None
        tasks = [t for t in self.tasks.get(agent, []) if replace_from is None or t.hop >= replace_from]
        body = Assign(tasks, self.setup.chunk_bytes, self.setup.compression, self.plan.groups(), replace_from)
        return self._send(agent, MessageType.ASSIGN, to_body(body), now)

    def _on_artifact_request(self, env: Envelope, now: float) -> Step:
        sha = body_of(ArtifactRequest, env.body).sha256
        blob = self.blobs.get(sha)
        if blob is None:
            raise ProtocolError("unknown_artifact", f"no artifact bundle {sha[:12]}")
        for p in self.outbox.pending.values():  # already on its way: our outbox resends what is missing
            if p.dst == env.src and p.purpose == Purpose.ARTIFACT and p.meta.get("sha256") == sha:
                return Step()
        _, out = self.outbox.send(
            env.src, self.setup.trial_id, Purpose.ARTIFACT, {"sha256": sha}, blob, self.setup.chunk_bytes, now
        )
        return Step(out)

    def _on_hop_started(self, env: Envelope, now: float) -> Step:
        report = body_of(HopStarted, env.body)
        if not self._assignee(env.src, report.hop):
            return Step()
        self.last_progress = now
        self.hop_started_at.setdefault(report.hop, now)
        return Step(events=[HopBegan(env.src, report)])

    def _on_hop_progress(self, env: Envelope, now: float) -> Step:
        report = body_of(HopProgress, env.body)
        if not self._assignee(env.src, report.hop):
            return Step()
        self.last_progress = now
        return Step(events=[HopMoved(env.src, report)])

    def _on_hop_done(self, env: Envelope, now: float) -> Step:
        done = body_of(HopDone, env.body)
        if done.hop in self.done_hops or not self._assignee(env.src, done.hop):
            return Step()
        self.last_progress = now
        self._finish(done)
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

    def _on_nack(self, env: Envelope, now: float) -> Step:
        out = self.outbox.on_nack(body_of(TransferNack, env.body), now)
        self.bytes_retransmitted += sum(o.size for o in out)
        return Step(out)

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
        src_hop = done.meta.get("from_hop")
        if isinstance(src_hop, int) and not self._assignee(done.src, src_hop):
            return
        decision = self.setup.strategy.on_model(self.plan, done)
        if decision.sends and self.plan.mode == "cs" and self.plan.algorithm == "snake":
            step.events.append(Relayed(int(done.meta.get("hop", -1))))  # before the sends go out
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

    # -- fault tolerance --------------------------------------------------------------------------
    @property
    def _tolerant(self) -> bool:
        return self.setup.reroute is not None and self.plan is not None and self.plan.algorithm == "snake"

    def _assignee(self, agent: str, hop: int) -> bool:
        """Reports about ``hop`` count only from the agent the (current) plan gives it to."""
        if self.plan is None or not 0 <= hop < len(self.plan.hops) or self.plan.hops[hop].agent == agent:
            return True
        log.info("%s reports on hop %d, which the plan now gives %s; ignored", agent, hop, self.plan.hops[hop].agent)
        return False

    def _current(self) -> int | None:
        """The first hop not finished (snake hops run one after another); None when all are."""
        assert self.plan is not None
        return next((h.hop for h in self.plan.hops if not self._is_done(h.hop)), None)

    def _is_done(self, hop: int) -> bool:
        return hop in self.done_hops or hop in self.unreported

    def _finish(self, done: HopDone) -> None:
        """Record ``done``. Snake hops run one after another, each from the output of the one before: a
        finished hop proves every earlier hop of the route finished, even one whose report was lost (an agent
        killed, a broker restarted without persistence before the coordinator read it)."""
        self.done_hops[done.hop] = done
        self.unreported.discard(done.hop)
        if self.plan is None or self.plan.algorithm != "snake":
            return
        missing = [h.hop for h in self.plan.hops if h.hop < done.hop and not self._is_done(h.hop)]
        if missing:
            log.warning("hop %d finished but no report came for hop(s) %s: they finished too (not trained again)",
                        done.hop, ", ".join(map(str, missing)))  # fmt: skip
            self.unreported.update(missing)

    def _on_heartbeat(self, env: Envelope, now: float) -> Step:
        self.heartbeating.add(env.src)
        return Step()

    def _watch(self, step: Step, now: float) -> None:
        """Find lost agents: last will (offline) past a grace, silence past ``silence_s``, a hop past its deadline."""
        assert self.plan is not None
        k = self._current()
        if k is None or now - self.link_down_at < SETTLE_S:
            return
        holder = self.plan.hops[k - 1].agent if k > 0 and self.plan.mode == "p2p" else None
        waiting = k not in self.hop_started_at  # the hop's model has not reached its agent yet
        for agent in sorted({h.agent for h in self.plan.hops[max(k - 1, 0) :]} - set(self.lost)):
            handing_on = agent == holder and waiting
            grace = self.setup.holder_grace_s if handing_on else self.setup.offline_grace_s
            off = self.offline_since.get(agent)
            heard = self.last_heard.get(agent, self.last_progress)
            if off is not None and now - off > grace:
                self._lose(step, agent, f"offline (last will) for {now - off:.0f} s", now)
                return
            # a sender's heartbeats queue behind the model it uploads: allow the model's travel time
            silence = max(grace, self.setup.silence_s) + (self._travel_s(k) if handing_on else 0.0)
            if agent in self.heartbeating and now - heard > silence:
                self._lose(step, agent, f"silent for {now - heard:.0f} s", now)
                return
        if waiting and k not in self.nudged and now - self.last_progress > 2 * self.setup.silence_s + self._travel_s(k):
            self.nudged.add(k)  # its hand-off may be lost (a resumed coordinator, a message gone): once more
            log.info("no news of hop %d for %.0f s; its starting model goes out again", k, now - self.last_progress)
            self._send_input(step, k, now, f"no news of hop {k}")
        deadline = self._deadline(k)
        if now - self.last_progress > deadline:
            agent = self.plan.hops[k].agent
            self._lose(step, agent, f"hop {k} made no progress for {now - self.last_progress:.0f} s "
                                    f"(deadline {deadline:.0f} s)", now)  # fmt: skip

    def _deadline(self, k: int) -> float:
        """How long hop ``k`` may go without news: the floor, plus its estimate, plus its model's travel."""
        assert self.plan is not None
        return self.setup.hop_timeout_s + 4 * self.plan.hops[k].est_s + self._travel_s(k)

    def _travel_s(self, k: int) -> float:
        """The time the model hop ``k`` starts from may take to reach its agent at ``min_throughput_bps``."""
        before = self.done_hops.get(k - 1)
        size = before.model_bytes if before is not None else len(self.setup.initial_model)
        return size / self.setup.min_throughput_bps

    def _lose(self, step: Step, agent: str, why: str, now: float) -> None:
        """``agent`` is out of the trial: re-route the rest around it."""
        if agent in self.lost or self.finished:
            return
        self.lost[agent] = why
        log.warning("lost %s: %s", agent, why)
        self.outbox.pending = {t: p for t, p in self.outbox.pending.items() if p.dst != agent}
        k = self._current()
        self._fault(step, "agent_lost", agent, k, why, "re-routing the rest of the trial around it", now)
        self._recover(step, now)

    def _holder(self, j: int) -> str | None:
        """Who can send the model hop ``j`` starts from: the coordinator, a live agent, or nobody."""
        assert self.plan is not None
        if self.plan.mode == "cs":
            held = getattr(self.setup.strategy, "hop", 0)
            return ME if held == j else None
        if j == 0:
            return ME
        agent = self.plan.hops[j - 1].agent
        return agent if agent not in self.lost and (agent, j - 1) not in self.no_copy else None

    def _recover(self, step: Step, now: float) -> None:
        """Re-plan from the newest hop whose starting model someone still holds, and send it there."""
        assert self.plan is not None and self.original is not None and self.setup.reroute is not None
        k = self._current()
        if k is None:
            return
        self.reroutes += 1
        limit = self.setup.max_reroutes or 3 * len({h.agent for h in self.original.hops})
        if self.reroutes > limit:
            self._fail(step, f"gave up after {limit} re-routes (lost: {', '.join(sorted(self.lost))})")
            return
        alive = self.plan.hops[k].agent not in self.lost
        start = k
        # a hop that started on an agent still in the trial has its model: nothing before it is needed again
        while not (alive and k in self.hop_started_at) and self._holder(start) is None:
            start -= 1  # the model that hop started from is gone with its agent: train it again
        # the current hop goes on where it is when its agent and its starting model are still there
        keep = start == k and alive
        first = k + 1 if keep else start
        live = {a: h for a, h in self.hellos.items() if a not in self.lost}
        try:
            plan = self.setup.reroute(self.plan, self.original, first, live) if first < self.total_hops else self.plan
        except (PlanError, CoordinatorError) as exc:
            self._fail(step, f"cannot re-route around {', '.join(sorted(self.lost))}: {exc}")
            return
        if not keep:
            lost_done = [j for j in range(start, k) if self._is_done(j)]
            self.hops_lost += len(lost_done)
            self.hops_retried += len(lost_done) + (1 if k in self.hop_started_at else 0)
            for j in range(start, self.total_hops):
                self.done_hops.pop(j, None)
                self.unreported.discard(j)
                self.hop_started_at.pop(j, None)
        self._replan(step, plan, first, now)
        if not keep:
            self._send_input(step, start, now, "re-routed after a lost agent")

    def _replan(self, step: Step, plan: Plan, start: int, now: float) -> None:
        """Make ``plan`` the route from ``start`` on and tell every available agent its hops from there."""
        assert self.plan is not None
        before = {h.agent for h in self.plan.hops}
        self.plan = plan
        backends = {a: h.backend for a, h in self.hellos.items()}
        self.tasks = hop_tasks(plan, self.artifacts, self.setup.settings, backends)
        self.last_progress = now
        self.nudged.clear()
        step.events.append(Replanned(plan, start))
        # the hop before ``start`` hands its model to the new route: its task changes too (unless it is history)
        current = self._current()
        first = max(start - 1, current if current is not None else start)
        for agent in sorted((before | {h.agent for h in plan.hops}) - set(self.lost)):
            step.out.append(self._assign(agent, now, replace_from=first))

    def _send_input(self, step: Step, j: int, now: float, reason: str) -> None:
        """Have the model hop ``j`` starts from sent to the agent that trains it."""
        assert self.plan is not None
        holder, dst = self._holder(j), self.plan.hops[j].agent
        if holder == ME:
            self.outbox.pending = {
                t: p
                for t, p in self.outbox.pending.items()
                if not (p.purpose == Purpose.MODEL and p.meta.get("hop") == j)
            }
            sends = self.setup.strategy.on_request(self.plan, dst, j)
            self.bytes_retransmitted += sum(len(s.data) for s in sends)
            self._send_models(step, sends, now)
        elif holder is not None:
            step.out.append(self._send(holder, MessageType.HAND_OFF, to_body(HandOff(j, dst, reason)), now))

    def _on_restart(self, agent: str, now: float) -> Step:
        """A known agent said hello from a new process: it lost its memory, not its disk."""
        assert self.plan is not None
        step = Step()
        k = self._current()
        if agent in self.lost:  # back after it was routed around: it gets its hops again from the next round
            self._readmit(step, agent, "said hello from a new process", now)
            return step
        if k is None:
            return Step([self._assign(agent, now)])
        step.out.append(self._assign(agent, now, replace_from=k))
        if self.plan.hops[k].agent == agent:  # it was to train (or was training) the current hop: again
            self.hops_retried += 1 if k in self.hop_started_at else 0
            self.hop_started_at.pop(k, None)
            self._fault(step, "agent_restarted", agent, k, "said hello from a new process",
                        f"hop {k} sent to it again", now)  # fmt: skip
            self._send_input(step, k, now, f"{agent} restarted")
        elif (
            k > 0 and self.plan.mode == "p2p" and self.plan.hops[k - 1].agent == agent and k not in self.hop_started_at
        ):
            self._fault(step, "agent_restarted", agent, k, "said hello from a new process",
                        f"it hands its model for hop {k} on again", now)  # fmt: skip
            self._send_input(step, k, now, "you restarted before your hand-off was acknowledged")
        else:  # it lost nothing the trial needs now: its hops from here on are all it must know again
            log.info("%s said hello from a new process; re-sending its hops from hop %d", agent, k)
        self.last_progress = now
        return step

    def _readmit(self, step: Step, agent: str, detail: str, now: float) -> None:
        """A lost agent is back: plan it in again from the next round (the current one goes on as it is)."""
        assert self.plan is not None
        del self.lost[agent]
        self.no_copy = {(a, j) for a, j in self.no_copy if a != agent}
        k = self._current()
        nxt = next((h.hop for h in self.plan.hops if k is not None and h.round > self.plan.hops[k].round), None)
        self._fault(step, "agent_returned", agent, k, detail,
                    f"planned in again from hop {nxt}" if nxt is not None else "no round left for it", now)  # fmt: skip
        if nxt is not None and self.original is not None and self.setup.reroute is not None:
            live = {a: h for a, h in self.hellos.items() if a not in self.lost}
            try:
                self._replan(step, self.setup.reroute(self.plan, self.original, nxt, live), nxt, now)
            except (PlanError, CoordinatorError) as exc:
                log.warning("cannot plan %s in again: %s", agent, exc)

    def _fault(
        self, step: Step, kind: str, agent: str, hop: int | None, detail: str, recovery: str, now: float
    ) -> None:
        step.events.append(Fault(round(now - self.started_at, 3), kind, agent, hop, detail, recovery))

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
