"""The trainer interface every agent backend implements.

A trainer holds one segment's training artifacts. Weights go in and out as
named float32 arrays under their wire names (the PyTorch parameter paths), so
backends can be mixed in one trial.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_agent.data import Inputs
from edge_agent.errors import EdgeAgentError

StepCallback = Callable[[int, int, float], None]
"""Called after each optimizer step with (step, total_steps, loss)."""


class TrainerError(EdgeAgentError):
    """A trainer cannot run: missing artifacts or weights, a tensor's name or shape, bad data."""


@dataclass(frozen=True)
class TrainSpec:
    """How one hop trains its segment."""

    epochs: int = 1  # passes over the local training partition
    batch_size: int = 64
    lr: float = 1e-3  # learning rate, set at run time
    max_steps: int | None = None  # stop early after this many optimizer steps
    seed: int = 0  # shuffling (and dropout) seed
    kd_alpha: float = 0.0  # knowledge-distillation weight; 0 = plain cross-entropy (needs a KD bundle if > 0)
    kd_temperature: float = 2.0  # distillation temperature T (> 0)


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the last epoch's steps
    steps: int
    samples: int
    seconds: float


@dataclass(frozen=True)
class EvalStats:
    loss: float  # mean cross-entropy
    accuracy: float  # fraction correct, 0..1
    samples: int


class Trainer(Protocol):
    """One backend (ONNX Runtime training, portable, fake) behind one face."""

    backend: str  # "ort", "portable", "fake": reported in the agent's hello

    def open(self, artifact_dir: Path) -> None:
        """Load a segment's artifact bundle (unpacked directory)."""

    def set_weights(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Load every named tensor (parameters and buffers) of the model."""

    def get_weights(self) -> dict[str, np.ndarray]:
        """Every named tensor of the model, float32, after training."""

    def release_weights(self) -> dict[str, np.ndarray]:
        """Like ``get_weights``, as the trainer's last act: it frees its sessions and optimizer state
        (and may hand over its own arrays instead of copying them). Load weights again to reuse it."""

    def train(self, x: Inputs, y: np.ndarray, spec: TrainSpec, on_step: StepCallback | None = None) -> TrainStats:
        """Train the trainable segment on (x, y); everything else stays frozen."""

    def evaluate(self, x: Inputs, y: np.ndarray, batch_size: int = 256) -> EvalStats:
        """Loss and accuracy of the current weights on (x, y)."""
