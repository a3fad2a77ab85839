"""Training a split-learning front with ONNX Runtime (``backend = "ort"``). Torch-free.

Per batch: a probe yields the activations A; ``exchange`` sends A and the labels to the
coordinator and returns dL/dA; the training step feeds dA to the surrogate loss sum(A * dA) and
the optimizer updates the front (the step recomputes the same A: same weights, same batch).

The probe is the bundle's ``probe_model.onnx`` (the front's forward in training mode, tensors as
inputs) run by an ``InferenceSession`` on the current weights: forward only, no state changed.
Measured alternatives (batch 64, one thread): the training graph itself fed dA = 0 (then gradients
reset and running statistics restored) took 36 ms for cnn/conv0 and 241 ms for vgg11/features.0-1,
the forward-only probe 5 ms and 61 ms, with bit-identical A. The eval graph is no option: it
normalises with running statistics, so its A is not the A the step differentiates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.data import Inputs
from edge_agent.ort_trainer import OrtTrainer, _Session
from edge_agent.ort_training import import_onnxruntime, ort_errors
from edge_agent.protocol.manifest import PROBE_FILE
from edge_agent.trainer import EvalStats, StepCallback, TrainerError, TrainSpec, TrainStats, run_steps

logger = logging.getLogger(__name__)

Exchange = Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, float]]
"""(batch sequence number, activations, labels) -> (dL/dA, the batch's loss), from the coordinator."""


class OrtFrontTrainer(OrtTrainer):
    """Trains a split front bundle (:mod:`coordinator.build.split_artifacts`) from the coordinator's gradients."""

    def open(self, artifact_dir: Path) -> None:
        super().open(artifact_dir)
        probe = Path(artifact_dir) / PROBE_FILE
        if not self.manifest.split_front or not probe.is_file():
            raise TrainerError(f"{artifact_dir} is not a split-learning front bundle (no activation shape or probe)")
        onnxruntime = import_onnxruntime()

        try:
            self._probe_session = onnxruntime.InferenceSession(
                str(probe), self._options(), providers=["CPUExecutionProvider"]
            )
        except ort_errors() as exc:
            raise TrainerError(f"cannot load {probe}: {exc}") from exc

    _probe_session: Any = None  # onnxruntime.InferenceSession over the probe graph

    def train(self, *args: object, **kwargs: object) -> TrainStats:
        raise TrainerError("a split-learning front trains with train_split (it needs the coordinator's gradients)")

    def evaluate(self, x: Inputs, y: np.ndarray, batch_size: int = 256) -> EvalStats:
        return EvalStats(float("nan"), float("nan"), 0)  # the front alone has no loss or accuracy

    def train_split(
        self, x: Inputs, y: np.ndarray, spec: TrainSpec, exchange: Exchange, on_step: StepCallback | None = None
    ) -> TrainStats:
        """Train the front for ``spec``'s epochs/steps; the loss reported is the coordinator's (cross-entropy)."""
        session = self._require_session()
        x, y = self._check_data(x, y)  # no label range: the front has no classes
        onnxruntime = import_onnxruntime()

        timing = {"probe": 0.0, "wait": 0.0, "step": 0.0}

        def step(seq: int, idx: np.ndarray) -> float:
            return self._batch(session, seq, x[idx], y[idx], exchange, timing)

        onnxruntime.set_seed(spec.seed)
        try:
            session.optimizer.set_learning_rate(spec.lr)
            session.module.train()
            stats = run_steps(len(x), spec, step, on_step)
        except ort_errors() as exc:
            raise TrainerError(f"front training step failed: {exc}") from exc
        per = {k: 1000 * v / max(stats.steps, 1) for k, v in timing.items()}
        logger.info("front: %d batches, per batch %.1f ms probe, %.1f ms step, %.1f ms waiting for gradients",
                    stats.steps, per["probe"], per["step"], per["wait"])  # fmt: skip
        return stats

    def _batch(
        self, session: _Session, seq: int, xb: np.ndarray, yb: np.ndarray, exchange: Exchange, timing: dict[str, float]
    ) -> float:
        t0 = time.perf_counter()
        activations = self._probe(session, xb)
        t1 = time.perf_counter()
        grad, loss = exchange(seq, activations, yb)
        t2 = time.perf_counter()
        if grad.shape != activations.shape or not np.all(np.isfinite(grad)):
            raise TrainerError(
                f"gradient for batch {seq} has shape {grad.shape}, expected {activations.shape}, or is not finite"
            )
        session.module(xb, np.ascontiguousarray(grad, dtype=np.float32))
        session.optimizer.step()
        session.module.lazy_reset_grad()
        timing["probe"] += t1 - t0
        timing["wait"] += t2 - t1
        timing["step"] += time.perf_counter() - t2
        return loss

    def _probe(self, session: _Session, xb: np.ndarray) -> np.ndarray:
        """Activations of ``xb`` in training mode (batch statistics) under the current weights; changes nothing."""
        feed = self._split(session.flat()) | {self.manifest.input_name: xb}
        (activations,) = self._probe_session.run([self.manifest.logits_name], feed)
        return np.asarray(activations, dtype=np.float32)
