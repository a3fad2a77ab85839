"""Written fakes (not patches) that implement the real interfaces: trainers, a model cache, a
split-learning back, the coordinator's jobs, and an executor that runs work inline.

The tests' in-memory trials (``tests/protocol/trial_bed.py``) and the control-plane benchmark
(``tools/inmemory.py``, ``tools/bench_control.py``) use them. The in-memory broker itself is real code
(``edge_agent.memlink``), shared with simulations.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from coordinator.build.bundle import pack_dir, write_manifest
from coordinator.events import BackStep, BuildArtifacts, Built, EvaluateRound, Evaluation, Stepped
from coordinator.plan import GroupInfo, Plan
from edge_agent.data import Inputs
from edge_agent.hop import Exchange
from edge_agent.model_cache import CachedModel
from edge_agent.protocol.delta import Base
from edge_agent.protocol.manifest import SegmentManifest, read_manifest
from edge_agent.trainer import EvalStats, StepCallback, TrainSpec, TrainStats

P = ParamSpec("P")
T = TypeVar("T")
SPLIT_BATCHES = 3  # batches a fake front trains per hop


class InlineExecutor(Executor):
    """Runs submitted work at once, in the caller's thread: a whole trial in one thread."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future, as a pool does
            future.set_exception(exc)
        return future


@dataclass
class Trained:
    """One fake training run: the model before and after, and what the segment owns."""

    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    trainable: tuple[str, ...]


class FakeTrainer:
    """Adds ``delta`` to every trainable tensor of the segment and to every buffer (running statistics
    follow every hop's data); evaluates to fixed figures."""

    backend = "fake"

    def __init__(self, delta: float = 1.0, log: list[Trained] | None = None) -> None:
        self.delta = delta
        self.log = log if log is not None else []
        self.manifest: SegmentManifest | None = None
        self.weights: dict[str, np.ndarray] = {}

    def open(self, artifact_dir: Path) -> None:
        self.manifest = read_manifest(artifact_dir)

    def set_weights(self, tensors: Mapping[str, np.ndarray]) -> None:
        self.weights = {k: np.array(v, dtype=np.float32) for k, v in tensors.items()}

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.weights.items()}

    def release_weights(self) -> dict[str, np.ndarray]:
        weights, self.weights = self.weights, {}
        return weights

    def _bump(self, times: float) -> None:
        assert self.manifest is not None
        before = self.get_weights()
        for name in (*self.manifest.trainable, *self.manifest.buffers):
            self.weights[name] = self.weights[name] + self.delta * times
        self.log.append(Trained(before, self.get_weights(), self.manifest.trainable))

    def train(self, x: Inputs, y: np.ndarray, spec: TrainSpec, on_step: StepCallback | None = None) -> TrainStats:
        self._bump(1)
        if on_step:
            on_step(1, 1, 0.5)
        return TrainStats(loss=0.5, steps=1, samples=len(x), seconds=0.0)

    def evaluate(self, x: Inputs, y: np.ndarray, batch_size: int = 256) -> EvalStats:
        return EvalStats(loss=0.4, accuracy=0.9, samples=len(x))


class FakeFrontTrainer(FakeTrainer):
    """A split-learning front: ``SPLIT_BATCHES`` batches (activations = the batch number), each checked
    against the fake back's answer (dL/dA = -A), then +1 per batch to the front and every buffer."""

    def __init__(self, log: list[Trained], losses: list[float]) -> None:
        super().__init__(log=log)
        self.losses = losses

    def train_split(
        self, x: Inputs, y: np.ndarray, spec: TrainSpec, exchange: Exchange, on_step: StepCallback | None = None
    ) -> TrainStats:
        for seq in range(SPLIT_BATCHES):
            activations = np.full((2, 3), seq, np.float32)
            gradient, loss = exchange(seq, activations, np.array([1, 3]))
            np.testing.assert_array_equal(gradient, -activations)  # exactly this batch's answer
            self.losses.append(loss)
        self._bump(SPLIT_BATCHES)
        return TrainStats(loss=self.losses[-1], steps=SPLIT_BATCHES, samples=2 * SPLIT_BATCHES, seconds=0.0)


@dataclass
class FakeTrainers:
    """``edge_agent.hop.Trainers`` for fakes; ``log`` collects every training run in order."""

    backend: str = "fake"
    log: list[Trained] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # the coordinator's loss per split batch
    record: bool = True  # False: keep no log (a thousand hops of copies add up)

    def make(self) -> FakeTrainer:
        return FakeTrainer(log=self.log if self.record else None)

    def make_front(self) -> FakeFrontTrainer:
        return FakeFrontTrainer(self.log, self.losses)


class CountingBack:
    """A split-learning back: dL/dA = -A, loss = mean label; every back tensor grows by 1 per step."""

    def __init__(self, groups: Sequence[Any]) -> None:  # GroupInfo-like: .params, .buffers
        self.weights = {t: np.zeros(3, np.float32) for g in groups for t in (*g.params, *g.buffers)}
        self.steps = 0

    def step(self, activations: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        self.steps += 1
        self.weights = {k: v + 1 for k, v in self.weights.items()}
        return -activations, float(labels.mean())

    def tensors(self) -> dict[str, np.ndarray]:
        return dict(self.weights)


def fake_bundle(plan: Plan, segment: int, groups: Sequence[GroupInfo], shapes: Mapping[str, tuple[int, ...]]) -> bytes:
    """A real bundle (a packed directory with a manifest) for a fake trainer."""
    seg = plan.segments[segment]
    if plan.algorithm == "split":  # a front holds only its own tensors
        shapes = {name: shape for name, shape in shapes.items() if name in seg.tensors}
        groups = [g for g in groups if g.name in seg.groups]
    buffers = tuple(b for g in groups for b in g.buffers)
    manifest = SegmentManifest(
        "input", "labels", "logits", "loss", tuple(shapes), dict(shapes), tuple(seg.params), buffers,
        tuple(b for g in groups if g.name in seg.groups for b in g.buffers), "adamw", 10, (1, 2, 2),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        write_manifest(Path(tmp), manifest)
        return pack_dir(Path(tmp))


@dataclass
class FakeJobs:
    """The coordinator's jobs for fakes: bundles with manifests, a counting back, fixed evaluations."""

    groups: Sequence[GroupInfo]
    shapes: Mapping[str, tuple[int, ...]]
    back: CountingBack | None = None
    evaluated: list[int] = field(default_factory=list)

    def build(self, job: BuildArtifacts) -> Built:
        arts, blobs = {}, {}
        for seg in job.plan.segments:
            blob = fake_bundle(job.plan, seg.index, self.groups, self.shapes)
            sha = hashlib.sha256(blob).hexdigest()
            arts[seg.index, "ort"], blobs[sha] = (sha, len(blob)), blob
        return Built(arts, blobs)

    def back_step(self, job: BackStep) -> Stepped:
        assert self.back is not None
        gradient, loss = self.back.step(job.activations, job.labels)
        return Stepped(gradient, loss)

    def evaluate(self, job: EvaluateRound) -> Evaluation:
        self.evaluated.append(job.round)
        return Evaluation(0.5, 1.0)


@dataclass
class MemoryModelCache:
    """An agent's last model kept in memory, with ModelCache's interface; ``wipe`` loses it."""

    kept: CachedModel | None = None
    saves: int = 0

    def save(
        self, trial_id: str, hop: int, versions: Mapping[str, int], tensors: Mapping[str, np.ndarray], digest: str
    ) -> None:
        copies = {name: np.array(t, dtype=np.float32) for name, t in tensors.items()}
        self.kept = CachedModel(trial_id, hop, Base(dict(versions), copies), digest)
        self.saves += 1

    def load(self, trial_id: str) -> CachedModel | None:
        return self.kept if self.kept is not None and self.kept.trial_id == trial_id else None

    def wipe(self) -> None:
        self.kept = None
