"""Written fakes (not patches): an in-memory broker and a trainer that implement the real interfaces."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.model_cache import CachedModel
from edge_agent.protocol.delta import Base
from edge_agent.trainer import EvalStats, StepCallback, TrainSpec, TrainStats


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest)."""
    pat, top = pattern.split("/"), topic.split("/")
    for i, p in enumerate(pat):
        if p == "#":
            return True
        if i >= len(top) or (p != "+" and p != top[i]):
            return False
    return len(pat) == len(top)


@dataclass
class MemoryBroker:
    """Delivers publishes to matching subscribers' queues, keeps retained messages, like a real broker."""

    queues: dict[str, deque[tuple[str, bytes]]] = field(default_factory=dict)
    subs: dict[str, list[str]] = field(default_factory=dict)
    retained: dict[str, bytes] = field(default_factory=dict)
    tamper: Callable[[str, bytes], list[bytes]] | None = None  # topic, payload -> payloads to deliver
    published: list[tuple[str, bytes]] = field(default_factory=list)

    def subscribe(self, client: str, pattern: str) -> None:
        self.queues.setdefault(client, deque())
        self.subs.setdefault(client, []).append(pattern)
        for topic, payload in self.retained.items():
            if topic_matches(pattern, topic):
                self.queues[client].append((topic, payload))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.published.append((topic, payload))
        if retain:
            self.retained[topic] = payload
        for delivered in self.tamper(topic, payload) if self.tamper else [payload]:
            for client, patterns in self.subs.items():
                if any(topic_matches(p, topic) for p in patterns):
                    self.queues[client].append((topic, delivered))


class FakeTrainer:
    """Adds ``delta`` to every trainable tensor of the segment; evaluates to fixed figures."""

    backend = "fake"

    def __init__(self, delta: float = 1.0) -> None:
        self.delta = delta
        self.trainable: list[str] = []
        self.weights: dict[str, np.ndarray] = {}

    def open(self, artifact_dir: Path) -> None:
        self.trainable = (artifact_dir / "trainable.txt").read_text().split()

    def set_weights(self, tensors: Mapping[str, np.ndarray]) -> None:
        self.weights = {k: np.array(v, dtype=np.float32) for k, v in tensors.items()}

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.weights.items()}

    def release_weights(self) -> dict[str, np.ndarray]:
        weights, self.weights = self.weights, {}
        return weights

    def train(self, x: np.ndarray, y: np.ndarray, spec: TrainSpec, on_step: StepCallback | None = None) -> TrainStats:
        for name in self.trainable:
            self.weights[name] = self.weights[name] + self.delta
        if on_step:
            on_step(1, 1, 0.5)
        return TrainStats(loss=0.5, steps=1, samples=len(x), seconds=0.0)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> EvalStats:
        return EvalStats(loss=0.4, accuracy=0.9, samples=len(x))


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
