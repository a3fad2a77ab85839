"""The agent process: wires the pure ``Agent`` to MQTT, the artifact store and a trainer.

One thread runs the message loop (callbacks of the MQTT client only enqueue);
training runs in a worker thread, so the agent keeps acknowledging transfers and
answering while it trains. A split-learning hop's worker hands each batch's activations to the
loop through a queue and waits (bounded by the task's gradient timeout) for the gradient the
loop passes back; the loop never waits for the worker.
"""

from __future__ import annotations

import json
import logging
import queue
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent import profile
from edge_agent.actions import Counters, Effects, Gradient, HopResult, ResendFull, SayBye, StoreArtifact, Train
from edge_agent.agent import Agent
from edge_agent.backends import make_trainer
from edge_agent.bundle import ArtifactStore
from edge_agent.calibrate import measure_gflops
from edge_agent.config import AgentConfig
from edge_agent.errors import EdgeAgentError
from edge_agent.handover import Loaded, full_model, hand_on, load_model
from edge_agent.localdata import LocalData
from edge_agent.model_cache import ModelCache
from edge_agent.mqtt import MqttLink, parse_broker_url
from edge_agent.protocol import topics
from edge_agent.protocol.delta import BaseMismatch
from edge_agent.protocol.envelope import Envelope, encode
from edge_agent.protocol.manifest import read_manifest
from edge_agent.protocol.messages import Hello, HopProgress, HopStarted, HopTask, Status, to_body
from edge_agent.protocol.split import encode_activations
from edge_agent.split_trainer import OrtFrontTrainer
from edge_agent.trainer import EvalStats, Trainer, TrainerError, TrainSpec, TrainStats

log = logging.getLogger(__name__)


def status_payload(agent_id: str, state: str) -> bytes:
    env = Envelope("status", agent_id, "*", to_body(Status(state)), created_at=time.time())
    return encode(env)


@dataclass
class _Running:
    task_hop: int
    src: str  # who sent the model
    future: Future[HopResult]


class AgentService:
    def __init__(self, config: AgentConfig, data: LocalData) -> None:
        self.config = config
        self.data = data
        if config.map_large_allocations:
            profile.map_large_allocations()
        self.store = ArtifactStore(config.cache_dir / "artifacts")
        self.models = ModelCache(config.cache_dir / "models")
        self.backend = make_trainer(config.backend, config.threads).backend
        self.progress: queue.Queue[HopProgress] = queue.Queue()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        self.running: _Running | None = None
        self.exit_reason: str | None = None
        self.batches_out: queue.Queue[tuple[int, int, bytes]] = queue.Queue()  # split: (hop, seq, activations)
        self.gradients: queue.Queue[Gradient | None] = queue.Queue()  # split: to the worker; None = stop
        self.link = MqttLink(
            parse_broker_url(config.broker),
            client_id=f"snake-agent-{config.agent_id}",
            subscriptions=[topics.agent_inbox(config.agent_id)],
            will=(topics.agent_status(config.agent_id), status_payload(config.agent_id, "offline"), True),
            clean_session=False,
        )
        self.agent = Agent(self._hello(), self._stored())

    def _hello(self) -> Hello:
        m = profile.machine()
        budget = self.config.memory_budget_mb or profile.memory_budget_mb()
        gflops = measure_gflops(self.config.threads) if self.config.calibrate else None
        return Hello(
            self.config.agent_id, self.backend, profile.versions(), str(m["arch"]), str(m["system"]), str(m["python"]),
            int(m["cores"]), int(m["memory_mb"]), budget, len(self.data.y_train), len(self.data.y_val),
            self.data.num_classes, self.data.input_shape, self.data.histogram(), gflops, round(profile.rss_mb(), 1),
            uuid.uuid4().hex[:12],
        )  # fmt: skip

    def _stored(self) -> set[str]:
        root = self.store.root
        return {p.name for p in root.iterdir() if p.is_dir() and self.store.has(p.name)} if root.exists() else set()

    def counters(self) -> Counters:
        return Counters(self.link.bytes_sent, self.link.bytes_received, profile.peak_rss_mb())

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> str:
        """Serve until told to exit; returns the reason."""
        self.link.start(timeout=self.config.connect_timeout_s)
        self.link.publish(
            topics.agent_status(self.config.agent_id), status_payload(self.config.agent_id, "online"), True
        )
        log.info("agent %s online at %s (backend %s)", self.config.agent_id, self.link.url, self.backend)
        self._apply(self.agent.start(time.time()))
        next_tick = time.monotonic() + self.config.tick_s
        try:
            while self.exit_reason is None:
                msg = self.link.get(timeout=0.05)
                if msg is not None:
                    self._apply(self.agent.handle(msg.topic, msg.payload, time.time()))
                self._collect_training()
                self._flush_progress()
                self._flush_batches()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.config.tick_s
                    self._apply(self.agent.tick(time.time(), self.counters()))
        finally:
            self.close()
        return self.exit_reason or "stopped"

    def close(self) -> None:
        self.gradients.put(None)  # a split worker waiting for a gradient stops now
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.link.connected:
            self.link.publish(
                topics.agent_status(self.config.agent_id), status_payload(self.config.agent_id, "offline"), True
            )
            self.link.wait_published(timeout=10.0)
        self.link.stop()

    def _apply(self, fx: Effects) -> None:
        for out in fx.out:
            self.link.publish(out.topic, out.payload, out.retain)
        for action in fx.actions:
            if isinstance(action, Train):
                self._start_training(action)
            elif isinstance(action, Gradient):
                self.gradients.put(action)
            elif isinstance(action, StoreArtifact):
                self._apply(self._store(action))
            elif isinstance(action, ResendFull):
                self._apply(self._resend(action))
            elif isinstance(action, SayBye):
                bye = self.agent.bye(self.counters(), time.time())
                self.link.publish(bye.topic, bye.payload)
                self.link.wait_published(timeout=10.0)
                if action.exit:
                    self.exit_reason = action.reason

    def _store(self, action: StoreArtifact) -> Effects:
        try:
            self.store.put(action.sha256, action.blob)
            return self.agent.artifact_stored(action.sha256, True, time.time())
        except (EdgeAgentError, OSError) as exc:
            log.error("could not store artifact bundle %s: %s; asking again", action.sha256[:12], exc)
            return self.agent.artifact_stored(action.sha256, False, time.time())

    def _resend(self, action: ResendFull) -> Effects:
        try:
            data = full_model(self.models, action.trial_id, action.hop - 1, action.layout, action.compression)
        except BaseMismatch as exc:
            log.error("cannot resend the model for hop %d to %s: %s", action.hop, action.dst, exc.message)
            return self.agent.resend(action.dst, action.hop, None, exc.message, time.time())
        return self.agent.resend(action.dst, action.hop, data, "", time.time())

    # -- training -----------------------------------------------------------------------------
    def _start_training(self, action: Train) -> None:
        task = action.task
        spec = TrainSpec(
            task.epochs, task.batch_size, task.lr, task.max_steps, task.seed, task.kd_alpha, task.kd_temperature
        )
        steps = task.epochs * (len(self.data.y_train) // task.batch_size)
        total = min(steps, task.max_steps) if task.max_steps else steps
        started = HopStarted(task.round, task.hop, task.segment, total)
        self._publish_report("hop_started", to_body(started))
        log.info(
            "hop %d (round %d): training segment %d (%s)", task.hop, task.round, task.segment, ", ".join(task.groups)
        )
        train = self._train_split if task.split else self._train
        self.running = _Running(task.hop, action.received.src, self.pool.submit(train, action, spec))

    def _on_step(self, task: HopTask) -> Callable[[int, int, float], None]:
        last = [0.0]

        def on_step(step: int, total: int, loss: float) -> None:
            now = time.monotonic()
            if now - last[0] >= self.config.progress_every_s or step == total:
                last[0] = now
                self.progress.put(HopProgress(task.round, task.hop, step, total, loss))

        return on_step

    def _load(self, action: Train, trainer: Trainer) -> Loaded:
        """Complete the received model (a delta, from the cached copy) and give it to ``trainer``."""
        loaded = load_model(action.received.take(), action.task, action.layout, self.models, action.trial_id)
        trainer.set_weights(loaded.take_tensors())  # a temporary: the received bytes go once copied
        profile.return_free_memory()
        return loaded

    def _train(self, action: Train, spec: TrainSpec) -> HopResult:
        task = action.task
        trainer = make_trainer(self.config.backend, self.config.threads)
        directory = self.store.path(task.artifact_sha256)
        trainer.open(directory)
        loaded = self._load(action, trainer)
        stats = trainer.train(self.data.x_train, self.data.y_train, spec, self._on_step(task))
        # evaluation batches as small as training's: a 256-sample forward pass was the hop's memory peak
        val = trainer.evaluate(self.data.x_val, self.data.y_val, task.batch_size) if len(self.data.y_val) else None
        return self._result(action, directory, trainer, loaded, stats, val)

    def _train_split(self, action: Train, spec: TrainSpec) -> HopResult:
        """Split learning: train the front batch by batch against the coordinator's gradients."""
        task = action.task
        if self.backend != "ort":
            raise TrainerError(f"split learning needs the ort backend; this agent runs {self.backend}")
        trainer = OrtFrontTrainer(self.config.threads)
        directory = self.store.path(task.artifact_sha256)
        trainer.open(directory)
        loaded = self._load(action, trainer)
        while not self.gradients.empty():  # nothing from an earlier hop may answer this one
            self.gradients.get_nowait()

        def exchange(seq: int, activations: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
            self.batches_out.put((task.hop, seq, encode_activations(activations, labels, self.agent.compression)))
            return self._await_gradient(task, seq)

        stats = trainer.train_split(self.data.x_train, self.data.y_train, spec, exchange, self._on_step(task))
        return self._result(action, directory, trainer, loaded, stats, None)

    def _await_gradient(self, task: HopTask, seq: int) -> tuple[np.ndarray, float]:
        deadline = time.monotonic() + task.gradient_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                answer = self.gradients.get(timeout=left)
            except queue.Empty:
                break
            if answer is None:
                raise TrainerError("the agent is stopping")
            if (answer.hop, answer.seq) == (task.hop, seq):
                return answer.gradient, answer.loss
        raise TrainerError(
            f"no gradient for batch {seq} of hop {task.hop} from the coordinator within {task.gradient_timeout_s:g} s"
        )

    def _result(
        self, action: Train, directory: Path, trainer: Trainer, loaded: Loaded, stats: TrainStats, val: EvalStats | None
    ) -> HopResult:
        task = action.task
        manifest = read_manifest(directory)
        trainable = sum(int(np.prod(manifest.shapes[n])) for n in manifest.trainable)
        val = val or EvalStats(float("nan"), float("nan"), 0)
        profile.return_free_memory()  # activations of training and evaluation: before the weights are copied out
        weights = trainer.release_weights()  # the training session goes before we encode
        profile.return_free_memory()
        out = hand_on(
            task, weights, loaded.versions, loaded.digests, action.layout, action.compression, self.models,
            action.trial_id,
        )  # fmt: skip
        return HopResult(task, out.data, out.checkpoint, stats, val, trainable)

    def _collect_training(self) -> None:
        if self.running is None or not self.running.future.done():
            return
        running, self.running = self.running, None
        try:
            result = running.future.result()
        except BaseMismatch as exc:  # the cached copy cannot complete the delta: fetch the whole model
            self._apply(self.agent.base_missing(running.task_hop, running.src, exc.message, time.time()))
            return
        except Exception as exc:  # a failed hop must be reported, not kill the agent
            log.exception("hop %d failed", running.task_hop)
            self._apply(self.agent.hop_failed(running.task_hop, f"{type(exc).__name__}: {exc}", time.time()))
            return
        fx = self.agent.hop_trained(result, self.counters(), time.time())
        del result, running  # the encoded model lives on only in its chunk frames
        self._apply(fx)

    def _flush_batches(self) -> None:
        while True:
            try:
                hop, seq, data = self.batches_out.get_nowait()
            except queue.Empty:
                return
            self._apply(self.agent.send_activations(hop, seq, data, time.time()))

    def _flush_progress(self) -> None:
        while True:
            try:
                report = self.progress.get_nowait()
            except queue.Empty:
                return
            self._publish_report("hop_progress", to_body(report))

    def _publish_report(self, kind: str, body: dict[str, object]) -> None:
        env = Envelope(
            kind, self.config.agent_id, topics.COORDINATOR, body, trial_id=self.agent.trial_id, created_at=time.time()
        )
        self.link.publish(topics.coordinator_inbox(), encode(env))


def describe(config: AgentConfig) -> str:
    """The config as JSON, broker password redacted."""
    data = {k: str(v) for k, v in config.__dict__.items()}
    data["broker"] = str(parse_broker_url(config.broker))
    return json.dumps(data, indent=2)
