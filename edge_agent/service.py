"""The agent process: wires the pure ``Agent`` to a ``Link``, the artifact store and a hop runner.

One thread runs the message loop (an MQTT link's callbacks only enqueue); training runs in a worker
thread, so the agent keeps acknowledging transfers and answering while it trains. A split-learning
hop's worker hands each batch's activations to the loop through a ``GradientChannel`` and waits
(bounded by the task's gradient timeout) for the gradient the loop passes back; the loop never waits
for the worker. Time comes from a ``Clock`` and the loop can be stepped (``poll``), so tests drive real
services over an in-memory link on a clock they advance.
"""

from __future__ import annotations

import json
import logging
import queue
import time
import uuid
from concurrent.futures import Executor, ThreadPoolExecutor

from edge_agent import profile
from edge_agent.actions import Counters, Effects, Gradient, ResendFull, SayBye, StoreArtifact, Train
from edge_agent.agent import Agent
from edge_agent.agent_file import read_secret
from edge_agent.backends import BackendTrainers
from edge_agent.bundle import ArtifactStore
from edge_agent.calibrate import measure_gflops
from edge_agent.config import AgentConfig
from edge_agent.errors import EdgeAgentError
from edge_agent.handover import Cache
from edge_agent.hop import GradientChannel, HopRunner, Running, Trainers, settle
from edge_agent.link import Clock, Link, SystemClock
from edge_agent.localdata import LocalData
from edge_agent.model_cache import ModelCache
from edge_agent.mqtt import BrokerUrl, MqttLink, parse_broker_url
from edge_agent.protocol import topics
from edge_agent.protocol.envelope import Envelope, encode
from edge_agent.protocol.kinds import MessageType
from edge_agent.protocol.messages import Hello, HopProgress, HopStarted, HopTask, Status, to_body
from edge_agent.secure_link import SecureLink
from edge_agent.tls import TlsFiles
from edge_agent.trainer import StepCallback

log = logging.getLogger(__name__)


def status_payload(agent_id: str, state: str, now: float) -> bytes:
    env = Envelope(MessageType.STATUS, agent_id, "*", to_body(Status(state)), created_at=now)
    return encode(env)


def broker_url(config: AgentConfig) -> BrokerUrl:
    """The broker's address and credentials: URL, then the config's user name and password file."""
    password = read_secret(config.password_file) if config.password_file is not None else None
    return parse_broker_url(config.broker, username=config.username, password=password)


def mqtt_link(config: AgentConfig) -> MqttLink:
    """The production link: a persistent MQTT session (what is sent to the agent while the broker restarts or
    the link is down waits for it) with an ``offline`` last will and an ``online`` status on every connect."""
    status = topics.agent_status(config.agent_id)
    return MqttLink(
        broker_url(config),
        client_id=f"snake-agent-{config.agent_id}",
        subscriptions=[topics.agent_inbox(config.agent_id)],
        will=(status, status_payload(config.agent_id, "offline", time.time()), True),
        clean_session=False,
        birth=(status, status_payload(config.agent_id, "online", time.time()), True),
        tls_files=TlsFiles.from_fields(config.tls_ca, config.tls_cert, config.tls_key),
    )


class AgentService:
    def __init__(
        self,
        config: AgentConfig,
        data: LocalData,
        link: Link | None = None,
        trainers: Trainers | None = None,
        models: Cache | None = None,
        clock: Clock | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.config, self.data = config, data
        self.clock = clock or SystemClock()
        self.link: Link = signed_link(config, link or mqtt_link(config), self.clock)
        if config.map_large_allocations:
            profile.map_large_allocations()
        self.store = ArtifactStore(config.cache_dir / "artifacts")
        self.trainers = trainers or BackendTrainers(config.backend, config.threads)
        self.channel = GradientChannel()
        self.hops = HopRunner(data, self.store, models or ModelCache(config.cache_dir / "models"), self.trainers,
                              self.channel)  # fmt: skip
        self.progress: queue.Queue[HopProgress] = queue.Queue()
        self.pool = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        self.running: Running | None = None
        self.exit_reason: str | None = None
        self.agent = Agent(self._hello(), self._stored())
        if isinstance(self.link, SecureLink):  # refused signatures count with the agent's other rejections
            self.link.guard.rejections = self.agent.rejections
        self._next_tick = 0.0

    def _hello(self) -> Hello:
        m = profile.machine()
        budget = self.config.memory_budget_mb or profile.memory_budget_mb()
        gflops = measure_gflops(self.config.threads) if self.config.calibrate else None
        return Hello(
            self.config.agent_id, self.trainers.backend, profile.versions(), str(m["arch"]), str(m["system"]),
            str(m["python"]), int(m["cores"]), int(m["memory_mb"]), budget, len(self.data.y_train),
            len(self.data.y_val), self.data.num_classes, self.data.input_shape, self.data.histogram(), gflops,
            round(profile.rss_mb(), 1), uuid.uuid4().hex[:12],
        )  # fmt: skip

    def _stored(self) -> set[str]:
        root = self.store.root
        return {p.name for p in root.iterdir() if p.is_dir() and self.store.has(p.name)} if root.exists() else set()

    def counters(self) -> Counters:
        c = self.link.counters()
        return Counters(c.bytes_sent, c.bytes_received, profile.peak_rss_mb())

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> str:
        """Serve until told to exit; returns the reason."""
        self.start()
        try:
            while self.exit_reason is None:
                self.poll(timeout=0.05)
        finally:
            self.close()
        return self.exit_reason or "stopped"

    def start(self) -> None:
        """Connect, say we are online and hello."""
        self.link.start(timeout=self.config.connect_timeout_s)
        self._publish_status("online")
        log.info("agent %s online at %s (backend %s)", self.config.agent_id, self.link.name, self.trainers.backend)
        self._apply(self.agent.start(self.clock.time()))
        self._next_tick = self.clock.monotonic() + self.config.tick_s

    def poll(self, timeout: float = 0.0) -> bool:
        """One turn of the loop: at most one message, the worker's news, timers. True if anything happened."""
        msg = self.link.get(timeout=timeout)
        if msg is not None:
            fx = self.agent.handle(msg.topic, msg.payload, self.clock.time())  # never raises
            try:
                self._apply(fx)
            except Exception as bug:  # a bug carrying out what a message asked: the loop goes on
                self.agent.guard.internal(bug, f"carrying out a message on {msg.topic}")
        moved = msg is not None
        moved |= self._collect_training()
        moved |= self._flush_progress()
        moved |= self._flush_batches()
        if self.clock.monotonic() >= self._next_tick:
            self._next_tick = self.clock.monotonic() + self.config.tick_s
            if not self.link.connected:
                self.agent.link_down(self.clock.time())
            self._apply(self.agent.tick(self.clock.time(), self.counters()))
        return moved

    @property
    def training(self) -> bool:
        return self.running is not None

    def close(self) -> None:
        self.channel.stop()  # a split worker waiting for a gradient stops now
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.link.connected:
            self._publish_status("offline")
            self.link.wait_published(timeout=10.0)
        self.link.stop()

    def _publish_status(self, state: str) -> None:
        payload = status_payload(self.config.agent_id, state, self.clock.time())
        self.link.publish(topics.agent_status(self.config.agent_id), payload, True)

    def _apply(self, fx: Effects) -> None:
        for out in fx.out:
            self.link.publish(out.topic, out.payload, out.retain)
        now = self.clock.time()
        for action in fx.actions:
            if isinstance(action, Train):
                self._start_training(action)
            elif isinstance(action, Gradient):
                self.channel.deliver(action)
            elif isinstance(action, StoreArtifact):
                self._apply(self._store(action, now))
            elif isinstance(action, ResendFull):
                self._apply(self.hops.resend(self.agent, action, now))
            elif isinstance(action, SayBye):
                bye = self.agent.bye(self.counters(), now)
                self.link.publish(bye.topic, bye.payload)
                self.link.wait_published(timeout=10.0)
                if action.exit:
                    self.exit_reason = action.reason

    def _store(self, action: StoreArtifact, now: float) -> Effects:
        try:
            self.store.put(action.sha256, action.blob)
            return self.agent.artifact_stored(action.sha256, True, now)
        except (EdgeAgentError, OSError) as exc:
            log.error("could not store artifact bundle %s: %s; asking again", action.sha256[:12], exc)
            return self.agent.artifact_stored(action.sha256, False, now)

    # -- training -----------------------------------------------------------------------------
    def _start_training(self, action: Train) -> None:
        task = action.task
        started = HopStarted(task.round, task.hop, task.segment, self.hops.total_steps(task))
        self._publish_report(MessageType.HOP_STARTED, to_body(started))
        log.info(
            "hop %d (round %d): training segment %d (%s)", task.hop, task.round, task.segment, ", ".join(task.groups)
        )
        train = self.hops.run_split if task.split else self.hops.run
        self.running = Running(task.hop, action.received.src, self.pool.submit(train, action, self._on_step(task)))

    def _on_step(self, task: HopTask) -> StepCallback:
        last = [float("-inf")]

        def on_step(step: int, total: int, loss: float) -> None:
            now = self.clock.monotonic()
            if now - last[0] >= self.config.progress_every_s or step == total:
                last[0] = now
                self.progress.put(HopProgress(task.round, task.hop, step, total, loss))

        return on_step

    def _collect_training(self) -> bool:
        if self.running is None or not self.running.future.done():
            return False
        running, self.running = self.running, None
        fx = settle(self.agent, running, self.counters, self.clock.time())
        del running  # the encoded model lives on only in its chunk frames
        self._apply(fx)
        return True

    def _flush_batches(self) -> bool:
        batches = self.channel.outgoing()
        for hop, seq, data in batches:
            self._apply(self.agent.send_activations(hop, seq, data, self.clock.time()))
        return bool(batches)

    def _flush_progress(self) -> bool:
        moved = False
        while True:
            try:
                report = self.progress.get_nowait()
            except queue.Empty:
                return moved
            moved = True
            self._publish_report(MessageType.HOP_PROGRESS, to_body(report))

    def _publish_report(self, kind: MessageType, body: dict[str, object]) -> None:
        env = Envelope(kind, self.config.agent_id, topics.COORDINATOR, body, trial_id=self.agent.trial_id,
                       created_at=self.clock.time())  # fmt: skip
        self.link.publish(topics.coordinator_inbox(), encode(env))


def signed_link(config: AgentConfig, link: Link, clock: Clock) -> Link:
    """With a signing key and a trust directory: sign what we send, accept only what trusted keys signed."""
    if config.signing_key is None and config.trust_dir is None:
        return link
    if config.signing_key is None or config.trust_dir is None:
        raise EdgeAgentError(
            "signed messages need both --signing-key and --trust-dir (a provisioned agent.toml has both)"
        )
    from edge_agent.secure_link import load_secure_link

    return load_secure_link(link, config.agent_id, config.signing_key, config.trust_dir, clock)


def describe(config: AgentConfig) -> str:
    """The config as JSON, broker password redacted."""
    data = {k: str(v) for k, v in config.__dict__.items()}
    data["broker"] = str(parse_broker_url(config.broker, username=config.username))
    return json.dumps(data, indent=2)
