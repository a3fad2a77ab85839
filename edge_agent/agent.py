"""The agent's state machine: messages and time in, messages and actions out.

Pure: it never touches a socket, clock, thread or file. ``AgentService`` wires
it to MQTT, the artifact store and a trainer. One hop goes:

  assign -> (artifact_request -> artifact chunks) -> model chunks from ``prev``
  -> Train action -> ``hop_trained`` -> model chunks to ``next`` + hop_done report

A split-learning hop (``task.split``) trains batch by batch: the trainer's activations go out
through ``send_activations`` and each awaited gradient comes back as a ``Gradient`` action.

Only what changed travels (``edge_agent.protocol.delta``): the service completes a received delta
from the agent's cached copy; when it cannot (``base_missing``), the agent asks the sender for the
whole model (``model_request``), and answers such requests from its own cache (``ResendFull``).
The agent keeps every model it sends until the receiver acknowledges its digest, and its last
model on disk after that.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping

from edge_agent.actions import (
    Counters,
    Effects,
    Gradient,
    HopResult,
    Received,
    ResendFull,
    SayBye,
    StoreArtifact,
    Train,
)
from edge_agent.protocol import topics
from edge_agent.protocol.envelope import Envelope, encode
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.guard import Guard, Rejections
from edge_agent.protocol.kinds import MessageType, Purpose
from edge_agent.protocol.messages import (
    Abort,
    ArtifactRequest,
    Assign,
    Bye,
    HandOff,
    Heartbeat,
    Hello,
    HopDone,
    HopTask,
    ModelRequest,
    Shutdown,
    TransferAck,
    TransferNack,
    body_of,
    to_body,
)
from edge_agent.protocol.split import batch_meta, decode_gradient, parse_batch
from edge_agent.protocol.transfer import (
    Completed,
    Outbox,
    Outgoing,
    PendingTransfer,
    Reassembler,
    error_message,
    sha256_hex,
)

log = logging.getLogger(__name__)
COORD = topics.COORDINATOR
ARTIFACT_RETRY_S = 30.0
HELLO_EVERY_S = 3.0  # while unassigned: a coordinator that connects later still hears us
HEARTBEAT_EVERY_S = 5.0  # while in a trial, also while a long hop trains (the coordinator's loss detector)


class Agent:
    def __init__(
        self, hello: Hello, artifacts: set[str], chunk_bytes: int = 1 << 20, heartbeat_s: float = HEARTBEAT_EVERY_S
    ) -> None:
        self.me = hello.agent_id
        self.hello = hello
        self.artifacts = set(artifacts)  # bundles present in the store
        self.chunk_bytes = chunk_bytes
        self.outbox = Outbox(self.me)
        self.trial_id: str | None = None
        self.compression = "none"
        self.layout: dict[str, list[str]] = {}  # layer group -> parameter names, from the assignment
        self.tasks: dict[int, HopTask] = {}  # by global hop
        self.models: dict[int, Received] = {}  # received models waiting for their hop
        self.awaiting: dict[int, tuple[str, float]] = {}  # hop -> (sender asked for the whole model, when)
        self.busy: int | None = None  # hop being trained
        self.gradient_for: tuple[int, int] | None = None  # split learning: (hop, seq) whose gradient we wait for
        self.finished: set[int] = set()
        self.requested: dict[str, float] = {}  # artifact sha -> when asked
        self.seen: OrderedDict[str, None] = OrderedDict()  # control message ids (QoS 1 duplicates)
        self.last_hello = float("-inf")
        self.heartbeat_s = heartbeat_s
        self.last_heartbeat = float("-inf")
        self.retransmitted = 0  # bytes sent again: resent chunks, whole-model resends
        self.guard = Guard(self.me)
        self.inbound = Reassembler(self.me, rejections=self.guard.rejections)

    # -- entry points -------------------------------------------------------------------------
    def start(self, now: float) -> Effects:
        self.last_hello = now
        return Effects([self._send(COORD, MessageType.HELLO, to_body(self.hello), now)])

    def handle(self, topic: str, payload: bytes, now: float) -> Effects:
        """Any inbound publish. Never raises: bad input is logged, counted (``rejections``), answered, dropped."""
        return self.guard.receive(topic, payload, now, lambda env: self._dispatch(env, now), Effects)

    @property
    def rejections(self) -> Rejections:
        return self.guard.rejections

    def tick(self, now: float, counters: Counters) -> Effects:
        fx = Effects(self.inbound.tick(now))
        if self.trial_id is None and now - self.last_hello >= HELLO_EVERY_S:
            fx.extend(self.start(now))
        if self.trial_id is not None and now - self.last_heartbeat >= self.heartbeat_s:
            self.last_heartbeat = now
            fx.out.append(self._send(COORD, MessageType.HEARTBEAT, to_body(Heartbeat(self.busy)), now))
        resend, failed = self.outbox.tick(now)
        fx.out.extend(resend)
        self.retransmitted += sum(o.size for o in resend)
        for p in failed:
            log.warning(
                "could not deliver %s transfer %s to %s; keeping it and telling the coordinator",
                p.purpose,
                p.transfer_id,
                p.dst,
            )
            self.outbox.pending[p.transfer_id] = p  # nothing is lost: keep it for a later retry
            p.attempts, p.sent_at = 0, now
            fx.out.append(
                self._error(
                    COORD, "peer_unreachable", f"{p.dst} has not acknowledged {p.purpose} transfer {p.transfer_id}", now
                )
            )
        for hop, (src, asked) in self.awaiting.items():
            if self._arriving(Purpose.MODEL, "hop", hop, now):
                self.awaiting[hop] = (src, now)  # it is on its way (a slow link): asking again would restart it
            elif now - asked > ARTIFACT_RETRY_S and hop not in self.models:
                self.awaiting[hop] = (src, now)
                fx.out.append(
                    self._send(src, MessageType.MODEL_REQUEST, to_body(ModelRequest(hop, "no answer yet")), now)
                )
        for sha, asked in self.requested.items():
            if self._arriving(Purpose.ARTIFACT, "sha256", sha, now):
                self.requested[sha] = now
            elif now - asked > ARTIFACT_RETRY_S and sha not in self.artifacts:
                self.requested[sha] = now
                fx.out.append(self._send(COORD, MessageType.ARTIFACT_REQUEST, to_body(ArtifactRequest(sha)), now))
        return fx

    def _arriving(self, purpose: Purpose, key: str, value: object, now: float) -> bool:
        """A transfer of ``purpose`` whose meta ``key`` is ``value`` got a chunk within the retry period."""
        return any(
            p.first.purpose == purpose and p.first.meta.get(key) == value and now - p.last_seen < ARTIFACT_RETRY_S
            for p in self.inbound.partial.values()
        )

    def link_down(self, now: float) -> None:
        """Our broker link is down: transfers wait in the broker, so their timers start again from ``now``."""
        self.outbox.postpone(now)
        self.inbound.postpone(now)

    def artifact_stored(self, sha: str, ok: bool, now: float) -> Effects:
        """The service stored (or failed to store) a bundle."""
        if ok:
            self.artifacts.add(sha)
            self.requested.pop(sha, None)
            return self._maybe_train(now)
        self.requested[sha] = now
        return Effects([self._send(COORD, MessageType.ARTIFACT_REQUEST, to_body(ArtifactRequest(sha)), now)])

    def hop_trained(self, result: HopResult, counters: Counters, now: float) -> Effects:
        """Training of ``result.task`` finished: hand the model on and report."""
        data = result.data
        task = self.tasks.get(result.task.hop, result.task)  # a re-plan while it trained may have moved `next`
        meta = {"hop": task.hop + 1, "from_hop": task.hop, "round": task.round}
        _, out = self.outbox.send(task.next, self.trial_id, Purpose.MODEL, meta, data, self.chunk_bytes, now)
        if result.checkpoint is not None:  # a copy for the coordinator's per-round evaluation
            out += self.outbox.send(
                COORD, self.trial_id, Purpose.CHECKPOINT, meta, result.checkpoint, self.chunk_bytes, now
            )[1]
        self.busy, self.gradient_for = None, None
        self.finished.add(task.hop)
        done = HopDone(
            task.round, task.hop, task.segment, result.train.loss, _finite(result.val.loss), _finite(result.val.accuracy),
            result.train.steps, result.train.samples, result.train.seconds, result.trainable_params,
            sha256_hex(data), len(data), counters.bytes_sent, counters.bytes_received, counters.peak_rss_mb,
            self.hello.backend,
        )  # fmt: skip
        fx = Effects(out + [self._send(COORD, MessageType.HOP_DONE, to_body(done), now)])
        return fx.extend(self._maybe_train(now))

    def hop_failed(self, hop: int, reason: str, now: float) -> Effects:
        """Training raised: tell the coordinator (the sender still has the model on disk)."""
        self.busy, self.gradient_for = None, None
        return Effects([self._error(COORD, "hop_failed", f"hop {hop} failed on {self.me}: {reason}", now)])

    def send_activations(self, hop: int, seq: int, data: bytes, now: float) -> Effects:
        """Split learning: the worker computed batch ``seq`` of ``hop``; send it and await its gradient."""
        task = self.tasks.get(hop)
        if task is None or self.busy != hop:
            log.warning("activations of hop %d batch %d: that hop is not training here; dropped", hop, seq)
            return Effects()
        self.gradient_for = (hop, seq)
        meta = batch_meta(hop, seq, round=task.round)
        _, out = self.outbox.send(COORD, self.trial_id, Purpose.ACTIVATIONS, meta, data, self.chunk_bytes, now)
        return Effects(out)

    def base_missing(self, hop: int, src: str, reason: str, now: float) -> Effects:
        """The received delta could not be completed from the cached copy: ask ``src`` for everything."""
        self.busy = None
        self.models.pop(hop, None)
        self.awaiting[hop] = (src, now)
        log.warning("hop %d: %s; asking %s for the whole model", hop, reason, src)
        return Effects([self._send(src, MessageType.MODEL_REQUEST, to_body(ModelRequest(hop, reason)), now)])

    def resend(self, dst: str, hop: int, data: bytes | None, reason: str, now: float) -> Effects:
        """The service built the whole model a receiver asked for (``data``), or could not (``reason``)."""
        if data is None:
            msg = f"{self.me} cannot resend the model for hop {hop} to {dst}: {reason}"
            return Effects([self._error(COORD, "resend_failed", msg, now), self._error(dst, "resend_failed", msg, now)])
        meta = {"hop": hop, "from_hop": hop - 1, "round": self.tasks[hop - 1].round if hop - 1 in self.tasks else -1}
        log.info("hop %d: resending the whole model to %s (%d bytes)", hop, dst, len(data))
        self.retransmitted += len(data)
        return Effects(self.outbox.send(dst, self.trial_id, Purpose.MODEL, meta, data, self.chunk_bytes, now)[1])

    def bye(self, counters: Counters, now: float) -> Outgoing:
        body = Bye(counters.bytes_sent, counters.bytes_received, counters.peak_rss_mb, len(self.finished),
                   bytes_retransmitted=self.retransmitted, rejected=self.rejections.as_dict())  # fmt: skip
        return self._send(COORD, MessageType.BYE, to_body(body), now)

    # -- dispatch -----------------------------------------------------------------------------
    def _dispatch(self, env: Envelope, now: float) -> Effects:
        if env.dst != self.me:
            raise ProtocolError("misrouted", f"message for {env.dst!r} reached {self.me!r}")
        if env.type == MessageType.CHUNK:
            return self._on_chunk(env, now)
        if env.id in self.seen:
            log.debug("duplicate %s %s dropped", env.type, env.id)
            return Effects()
        self._remember(env.id)
        if env.error is not None:
            log.warning("error from %s (reply to %s): %s", env.src, env.reply_to, env.error)
            return Effects()
        handler = {
            MessageType.ASSIGN: self._on_assign,
            MessageType.TRANSFER_ACK: self._on_ack,
            MessageType.TRANSFER_NACK: self._on_nack,
            MessageType.MODEL_REQUEST: self._on_model_request,
            MessageType.HAND_OFF: self._on_hand_off,
            MessageType.ABORT: self._on_abort,
            MessageType.SHUTDOWN: self._on_shutdown,
        }.get(env.type)
        if handler is None:
            raise ProtocolError("unknown_type", f"agents do not handle {env.type!r} messages")
        self._check_trial(env)
        return handler(env, now)

    def _check_trial(self, env: Envelope) -> None:
        """Only ``assign`` starts a trial. Commands naming another trial are stale (e.g. queued in this
        agent's persistent session while it was down) and must not stop or disturb a new one."""
        if env.type == MessageType.ASSIGN or env.trial_id in (None, self.trial_id):
            return
        if self.trial_id is None and env.type in (MessageType.CHUNK, MessageType.TRANSFER_ACK):
            return  # a model may arrive just before its assignment; an ack for a restarted sender is moot
        if self.trial_id is None and env.type == MessageType.SHUTDOWN and self.hello.instance:
            if env.body.get("instance") == self.hello.instance:
                return  # the coordinator of a trial that left us out: it heard this very process
        raise ProtocolError("wrong_trial", f"message for trial {env.trial_id!r}; this agent runs {self.trial_id!r}")

    def _remember(self, msg_id: str) -> None:
        self.seen[msg_id] = None
        while len(self.seen) > 4096:
            self.seen.popitem(last=False)

    def _on_assign(self, env: Envelope, now: float) -> Effects:
        assign = body_of(Assign, env.body)
        if self.busy is not None and env.trial_id != self.trial_id:
            raise ProtocolError("busy", f"training hop {self.busy} of trial {self.trial_id!r}")
        if env.trial_id != self.trial_id:  # a new trial: forget the old one, keep its models that came early
            self.models = {hop: r for hop, r in self.models.items() if r.trial_id == env.trial_id}
            self.tasks, self.finished, self.awaiting = {}, set(), {}
            self._forget_transfers(lambda p: p.purpose != Purpose.ARTIFACT)  # nothing of an old trial goes on
        self.trial_id, self.compression, self.layout = env.trial_id, assign.compression, assign.groups
        self.chunk_bytes = assign.chunk_bytes
        if assign.replace_from is not None:  # a re-plan: later hops go where the new tasks say
            first = assign.replace_from
            self.tasks = {hop: t for hop, t in self.tasks.items() if hop < first}
        self.tasks.update({t.hop: t for t in assign.tasks})
        if assign.replace_from is not None:
            stale = [hop for hop in self.models if hop not in self.tasks]
            for hop in stale:
                log.info("hop %d is no longer ours after a re-plan; dropping its model", hop)
                del self.models[hop]
        log.info("trial %s: assigned %d hop(s): %s%s", self.trial_id, len(assign.tasks), [t.hop for t in assign.tasks],
                 "" if assign.replace_from is None else f" (re-planned from hop {assign.replace_from})")  # fmt: skip
        fx = Effects()
        for sha in sorted({t.artifact_sha256 for t in assign.tasks} - self.artifacts):
            if sha not in self.requested:
                self.requested[sha] = now
                fx.out.append(self._send(COORD, MessageType.ARTIFACT_REQUEST, to_body(ArtifactRequest(sha)), now))
        return fx.extend(self._maybe_train(now))

    def _on_ack(self, env: Envelope, now: float) -> Effects:
        done = self.outbox.on_ack(body_of(TransferAck, env.body))
        if done is not None:
            log.info(
                "%s transfer %s acknowledged by %s (%d bytes)", done.purpose, done.transfer_id, done.dst, done.size
            )
        return Effects()

    def _on_nack(self, env: Envelope, now: float) -> Effects:
        out = self.outbox.on_nack(body_of(TransferNack, env.body), now)
        self.retransmitted += sum(o.size for o in out)
        return Effects(out)

    def _on_model_request(self, env: Envelope, now: float) -> Effects:
        request = body_of(ModelRequest, env.body)
        if request.hop - 1 not in self.finished or self.trial_id is None:
            raise ProtocolError("unknown_hop", f"{self.me} did not hand on the model for hop {request.hop}")
        log.info("%s asks for the whole model for hop %d: %s", env.src, request.hop, request.reason)
        action = ResendFull(env.src, request.hop, self.trial_id, self.layout, self.compression)
        return Effects(actions=[action])

    def _on_hand_off(self, env: Envelope, now: float) -> Effects:
        """The coordinator re-routes: send our model for ``hop`` to ``to`` (whole, from the cache), and stop
        pushing it anywhere else."""
        order = body_of(HandOff, env.body)
        if self.trial_id is None or env.src != COORD:
            raise ProtocolError("unknown_hop", f"{self.me} runs no trial to hand a model of")
        dropped = self._forget_transfers(lambda p: p.purpose == Purpose.MODEL and p.meta.get("hop") == order.hop)
        log.info("hop %d: handing the model to %s (%s)%s", order.hop, order.to, order.reason,
                 f"; dropped {dropped} earlier transfer(s) of it" if dropped else "")  # fmt: skip
        self.finished.add(order.hop - 1)  # we hold its output (a restarted agent forgot that it trained it)
        return Effects(actions=[ResendFull(order.to, order.hop, self.trial_id, self.layout, self.compression)])

    def _forget_transfers(self, which: Callable[[PendingTransfer], bool]) -> int:
        gone = [tid for tid, p in self.outbox.pending.items() if which(p)]
        for tid in gone:
            del self.outbox.pending[tid]
        return len(gone)

    def _on_abort(self, env: Envelope, now: float) -> Effects:
        log.error("trial %s aborted by %s: %s", self.trial_id, env.src, body_of(Abort, env.body).reason)
        self.tasks, self.models, self.awaiting = {}, {}, {}
        self._forget_transfers(lambda p: p.purpose != Purpose.ARTIFACT)
        return Effects()

    def _on_shutdown(self, env: Envelope, now: float) -> Effects:
        order = body_of(Shutdown, env.body)
        self._forget_transfers(lambda p: True)  # the trial is over: nothing of it is retried into the next
        return Effects(actions=[SayBye(order.reason, order.exit)])

    def _on_chunk(self, env: Envelope, now: float) -> Effects:
        self._check_trial(env)
        done, out = self.inbound.add(env, now)
        fx = Effects(out)
        if done is None:
            return fx
        if done.purpose == Purpose.ARTIFACT:
            return fx.extend(self._on_artifact(done))
        if done.purpose == Purpose.MODEL:
            return fx.extend(self._on_model(done, now))
        if done.purpose == Purpose.GRADIENTS:
            return fx.extend(self._on_gradient(done))
        log.warning("transfer %s from %s has unknown purpose %r; dropped", done.transfer_id, done.src, done.purpose)
        return fx

    def _on_artifact(self, done: Completed) -> Effects:
        if done.meta.get("sha256") != done.sha256:
            raise ProtocolError("malformed", f"artifact transfer {done.transfer_id} names a different digest")
        if done.sha256 in self.artifacts:
            return Effects()  # a second answer to a repeated request: stored already
        if done.sha256 not in self.requested:
            raise ProtocolError("unexpected", f"artifact {done.sha256[:12]} was not requested")
        return Effects(actions=[StoreArtifact(done.sha256, done.data)])

    def _on_gradient(self, done: Completed) -> Effects:
        hop, seq = parse_batch(done.meta)
        if self.gradient_for != (hop, seq):  # a duplicate, a late answer or one for another hop
            log.warning("gradient for hop %d batch %d from %s not awaited (awaiting %s); dropped",
                        hop, seq, done.src, self.gradient_for)  # fmt: skip
            return Effects()
        loss = done.meta.get("loss")
        if not isinstance(loss, int | float) or isinstance(loss, bool):
            raise ProtocolError("malformed", f"gradient for hop {hop} batch {seq} carries no loss")
        gradient = decode_gradient(done.data)
        self.gradient_for = None
        return Effects(actions=[Gradient(hop, seq, gradient, float(loss))])

    def _on_model(self, done: Completed, now: float) -> Effects:
        hop = done.meta.get("hop")
        if not isinstance(hop, int) or hop in self.finished or hop == self.busy or hop in self.models:
            log.warning("model transfer %s from %s for hop %r: not expected; dropped", done.transfer_id, done.src, hop)
            return Effects()
        task = self.tasks.get(hop)
        if task is not None and done.src not in (task.prev, COORD) and hop not in self.awaiting:
            # a stale hand-off: the route changed (a re-plan) and this sender no longer feeds this hop
            log.warning("model transfer %s for hop %d from %s dropped: the plan has it come from %s",
                        done.transfer_id, hop, done.src, task.prev)  # fmt: skip
            return Effects()
        if task is None and len(self.models) >= 2:
            log.warning("model transfer %s for unassigned hop %d dropped (buffer full)", done.transfer_id, hop)
            return Effects()
        self.awaiting.pop(hop, None)
        self.models[hop] = Received(done.src, hop, len(done.data), done.data, done.trial_id)  # early ones wait too
        log.info("hop %d: model received from %s (%d bytes)", hop, done.src, len(done.data))
        return self._maybe_train(now)

    def _maybe_train(self, now: float) -> Effects:
        if self.busy is not None:
            return Effects()
        for hop in sorted(self.models):
            task = self.tasks.get(hop)
            if task is not None and task.artifact_sha256 in self.artifacts and self.trial_id is not None:
                self.busy = hop
                received = self.models.pop(hop)  # the service frees the bytes once the trainer holds them
                return Effects(actions=[Train(task, received, self.trial_id, self.layout, self.compression)])
        return Effects()

    # -- helpers ------------------------------------------------------------------------------
    def _send(self, dst: str, kind: MessageType, body: Mapping[str, object], now: float) -> Outgoing:
        env = Envelope(kind, self.me, dst, dict(body), trial_id=self.trial_id, created_at=now)
        return Outgoing(topics.inbox(dst), encode(env))

    def _error(self, dst: str, code: str, message: str, now: float) -> Outgoing:
        return error_message(self.me, dst, self.trial_id, code, message, now)


def _finite(value: float) -> float | None:
    """JSON carries no NaN: an undefined figure travels as null."""
    return value if math.isfinite(value) else None
