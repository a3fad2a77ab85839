"""The trainer interface every agent backend implements, and the hop's training loop they share.

A trainer holds one segment's training artifacts. Weights go in and out as
named float32 arrays under their wire names (the PyTorch parameter paths), so
backends can be mixed in one trial. Every backend walks its data with
:func:`run_steps`: the same batches in the same order from the same seed, the
same progress calls and the same statistics; a backend supplies only the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_agent.data import Inputs
from edge_agent.errors import EdgeAgentError
from edge_agent.protocol.manifest import IGNORE_INDEX

StepCallback = Callable[[int, int, float], None]
"""Called after each optimizer step with (step, total_steps, loss)."""

BatchStep = Callable[[int, np.ndarray], float]
"""One optimizer step: (step number from 0, the batch's sample indices) -> the batch's loss."""

Forward = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]
"""(inputs, labels) of a batch -> (mean loss, logits [rows, num_classes]; [rows, T, vocab] for a language
model) in inference mode."""


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
    logit_adjust: float = 0.0  # tau of the logit adjustment by the hop's label prior; 0 = off (needs a KD bundle)
    prox_mu: float = 0.0  # FedProx: pull the trained parameters toward their starting values (0 = off)


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the last epoch's steps
    steps: int
    samples: int
    seconds: float


@dataclass(frozen=True)
class EvalStats:
    loss: float  # mean cross-entropy (per counted label: per token for a language model)
    accuracy: float  # fraction of counted labels predicted right, 0..1
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


def plan_steps(spec: TrainSpec, samples: int) -> tuple[int, int, int]:
    """(batch size, steps per epoch, total steps); the incomplete last batch of an epoch is dropped."""
    if spec.batch_size < 1 or spec.epochs < 1 or (spec.max_steps is not None and spec.max_steps < 0):
        raise TrainerError(f"bad train spec: {spec}")
    batch = min(spec.batch_size, samples)
    per_epoch = samples // batch  # a batch of 1 upsets BatchNorm, so no ragged batches
    total = per_epoch * spec.epochs if spec.max_steps is None else min(per_epoch * spec.epochs, spec.max_steps)
    return batch, per_epoch, total


def batch_order(spec: TrainSpec, samples: int) -> Iterator[tuple[np.ndarray, bool]]:
    """The hop's batches as (sample indices, first batch of an epoch), reshuffled every epoch from
    ``spec.seed``; every trainer walks its data in this same order."""
    batch, per_epoch, total = plan_steps(spec, samples)
    rng = np.random.default_rng(spec.seed)
    steps = 0
    while steps < total:
        order, count = rng.permutation(samples), min(per_epoch, total - steps)
        for k in range(count):
            yield order[k * batch : (k + 1) * batch], k == 0
        steps += count


def run_steps(samples: int, spec: TrainSpec, step: BatchStep, on_step: StepCallback | None = None) -> TrainStats:
    """Train for ``spec``'s epochs (at most ``max_steps``) over ``samples`` samples, one ``step`` a batch.

    The loss reported is the mean over the last epoch's steps (NaN when no step ran); ``on_step``
    hears (step, total steps, loss) after every step. Exceptions from ``step`` propagate.
    """
    batch, _, total = plan_steps(spec, samples)
    started, steps, losses = time.perf_counter(), 0, [float("nan")]
    for idx, new_epoch in batch_order(spec, samples):
        if new_epoch:
            losses = []  # the reported loss is the last epoch's mean
        losses.append(step(steps, idx))
        steps += 1
        if on_step is not None:
            on_step(steps, total, losses[-1])
    seconds = time.perf_counter() - started
    return TrainStats(loss=float(np.mean(losses)), steps=steps, samples=steps * batch, seconds=seconds)


def run_eval(x: Inputs, y: np.ndarray, batch_size: int, forward: Forward) -> EvalStats:
    """Mean loss and accuracy of ``forward`` over (x, y), in batches of ``batch_size`` rows.

    Labels [N] (classifier) or [N, T] (language model: every label but IGNORE_INDEX counts, and
    the batch's mean loss is weighted by its counted labels)."""
    total_loss, correct, counted, size = 0.0, 0, 0, max(1, batch_size)
    for start in range(0, len(x), size):
        xb, yb = x[start : start + size], y[start : start + size]
        loss, logits = forward(xb, yb)
        mask = yb != IGNORE_INDEX
        count = int(np.count_nonzero(mask))
        total_loss += loss * count if count else 0.0
        counted += count
        correct += int(np.count_nonzero((np.argmax(logits, axis=-1) == yb) & mask))
    counted = max(counted, 1)
    return EvalStats(loss=total_loss / counted, accuracy=correct / counted, samples=len(x))
