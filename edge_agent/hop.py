"""One hop on the device: load the received model, train the segment, hand the model on.

``HopRunner`` runs a ``Train`` action in the service's training worker (and a ``ResendFull`` in its
loop) against the artifact store, the model cache, the local data and a trainer. ``settle`` maps how
the hop ended to what the pure ``Agent`` does next: a model handed on, the whole model asked for
(the cached copy could not complete a delta), or a failure reported. A split-learning hop trains batch
by batch against the coordinator's gradients, which reach the worker through a ``GradientChannel``.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_agent import profile
from edge_agent.actions import Counters, Effects, Gradient, HopResult, ResendFull, Train
from edge_agent.agent import Agent
from edge_agent.bnstats import mix_running_stats, mixed_buffers, running_stats
from edge_agent.bundle import ArtifactStore
from edge_agent.data import Inputs
from edge_agent.handover import Cache, Loaded, full_model, hand_on, load_model
from edge_agent.localdata import LocalData
from edge_agent.protocol.delta import BaseMismatch
from edge_agent.protocol.manifest import read_manifest
from edge_agent.protocol.messages import HopTask
from edge_agent.protocol.split import encode_activations
from edge_agent.trainer import EvalStats, StepCallback, Trainer, TrainerError, TrainSpec, TrainStats

log = logging.getLogger(__name__)

Exchange = Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, float]]


class FrontTrainer(Trainer, Protocol):
    """A split-learning front: trains against gradients that come from elsewhere."""

    def train_split(
        self, x: Inputs, y: np.ndarray, spec: TrainSpec, exchange: Exchange, on_step: StepCallback | None = None
    ) -> TrainStats: ...


class Trainers(Protocol):
    """Makes a fresh trainer per hop (``make``) or per split-learning front hop (``make_front``)."""

    backend: str

    def make(self) -> Trainer: ...

    def make_front(self) -> FrontTrainer:
        """TrainerError if this backend cannot train a split-learning front."""


class GradientChannel:
    """Split learning: batches go out from the worker, gradients come back to it (bounded waits)."""

    def __init__(self) -> None:
        self.batches: queue.Queue[tuple[int, int, bytes]] = queue.Queue()  # (hop, seq, activations)
        self.gradients: queue.Queue[Gradient | None] = queue.Queue()  # None: stop waiting

    def deliver(self, gradient: Gradient) -> None:
        self.gradients.put(gradient)

    def stop(self) -> None:
        self.gradients.put(None)

    def outgoing(self) -> list[tuple[int, int, bytes]]:
        out = []
        while True:
            try:
                out.append(self.batches.get_nowait())
            except queue.Empty:
                return out

    def exchange_for(self, task: HopTask, compression: str) -> Exchange:
        while not self.gradients.empty():  # nothing from an earlier hop may answer this one
            self.gradients.get_nowait()

        def exchange(seq: int, activations: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
            self.batches.put((task.hop, seq, encode_activations(activations, labels, compression)))
            return self._await(task, seq)

        return exchange

    def _await(self, task: HopTask, seq: int) -> tuple[np.ndarray, float]:
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


@dataclass
class Running:
    """A hop in the training worker."""

    task_hop: int
    src: str  # who sent the model
    future: Future[HopResult]


class HopRunner:
    def __init__(
        self, data: LocalData, store: ArtifactStore, models: Cache, trainers: Trainers, channel: GradientChannel
    ) -> None:
        self.data, self.store, self.models, self.trainers, self.channel = data, store, models, trainers, channel

    def spec(self, task: HopTask) -> TrainSpec:
        return TrainSpec(
            task.epochs, task.batch_size, task.lr, task.max_steps, task.seed, task.kd_alpha, task.kd_temperature,
            task.logit_adjust, task.prox_mu,
        )  # fmt: skip

    def total_steps(self, task: HopTask) -> int:
        steps = task.epochs * (len(self.data.y_train) // task.batch_size)
        return min(steps, task.max_steps) if task.max_steps else steps

    def run(self, action: Train, on_step: StepCallback) -> HopResult:
        """Train an ordinary hop (in the worker thread)."""
        task = action.task
        trainer = self.trainers.make()
        directory, loaded, kept = self._open(action, trainer)
        stats = trainer.train(self.data.x_train, self.data.y_train, self.spec(task), on_step)
        # evaluation batches as small as training's: a 256-sample forward pass was the hop's memory peak
        val = trainer.evaluate(self.data.x_val, self.data.y_val, task.batch_size) if len(self.data.y_val) else None
        return self._result(action, directory, trainer, loaded, stats, val, kept)

    def run_split(self, action: Train, on_step: StepCallback) -> HopResult:
        """Split learning: train the front batch by batch against the coordinator's gradients."""
        task = action.task
        trainer = self.trainers.make_front()
        directory, loaded, _ = self._open(action, trainer)
        exchange = self.channel.exchange_for(task, action.compression)
        stats = trainer.train_split(self.data.x_train, self.data.y_train, self.spec(task), exchange, on_step)
        return self._result(action, directory, trainer, loaded, stats, None)

    def resend(self, agent: Agent, action: ResendFull, now: float) -> Effects:
        """Build the whole model a receiver asked for from the cached copy (or say why not)."""
        try:
            data = full_model(self.models, action.trial_id, action.hop - 1, action.layout, action.compression)
        except BaseMismatch as exc:
            log.error("cannot resend the model for hop %d to %s: %s", action.hop, action.dst, exc.message)
            return agent.resend(action.dst, action.hop, None, exc.message, now)
        return agent.resend(action.dst, action.hop, data, "", now)

    def _open(self, action: Train, trainer: Trainer) -> tuple[Path, Loaded, dict[str, np.ndarray]]:
        """Open the segment's bundle and give ``trainer`` the whole received model; also the received
        BatchNorm running statistics when the hop mixes them (``bn_mix``), else {}."""
        directory = self.store.path(action.task.artifact_sha256)
        trainer.open(directory)
        kept: dict[str, np.ndarray] = {}
        return directory, self._load(action, trainer, kept), kept

    def _load(self, action: Train, trainer: Trainer, kept: dict[str, np.ndarray]) -> Loaded:
        """Complete the received model (a delta, from the cached copy) and give it to ``trainer``."""
        loaded = load_model(action.received.take(), action.task, action.layout, self.models, action.trial_id)

        def keep(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if action.task.bn_mix > 0:
                kept.update(running_stats(tensors, list(tensors)))
            return tensors

        trainer.set_weights(keep(loaded.take_tensors()))  # a temporary: the received bytes go once copied
        profile.return_free_memory()
        return loaded

    def _result(
        self,
        action: Train,
        directory: Path,
        trainer: Trainer,
        loaded: Loaded,
        stats: TrainStats,
        val: EvalStats | None,
        kept: dict[str, np.ndarray] | None = None,
    ) -> HopResult:
        task = action.task
        manifest = read_manifest(directory)
        trainable = sum(int(np.prod(manifest.shapes[n])) for n in manifest.trainable)
        val = val or EvalStats(float("nan"), float("nan"), 0)
        profile.return_free_memory()  # activations of training and evaluation: before the weights are copied out
        weights = trainer.release_weights()  # the training session goes before we encode
        if kept:  # frozen layers' BatchNorm statistics: a running average over hops, not this hop's data alone
            weights = mix_running_stats(kept, weights, mixed_buffers(manifest), task.bn_mix)
        profile.return_free_memory()
        out = hand_on(
            task, weights, loaded.versions, loaded.digests, action.layout, action.compression, self.models,
            action.trial_id,
        )  # fmt: skip
        return HopResult(task, out.data, out.checkpoint, stats, val, trainable)


def settle(agent: Agent, running: Running, counters: Callable[[], Counters], now: float) -> Effects:
    """What the agent does once a hop's worker has finished, however it finished."""
    try:
        result = running.future.result()
    except BaseMismatch as exc:  # the cached copy cannot complete the delta: fetch the whole model
        return agent.base_missing(running.task_hop, running.src, exc.message, now)
    except Exception as exc:  # a failed hop must be reported, not kill the agent
        log.exception("hop %d failed", running.task_hop)
        return agent.hop_failed(running.task_hop, f"{type(exc).__name__}: {exc}", now)
    return agent.hop_trained(result, counters(), now)
