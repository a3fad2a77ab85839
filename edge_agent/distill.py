"""Knowledge-distillation inputs every trainer backend feeds a KD bundle (numpy only).

A KD bundle's graphs (see :mod:`coordinator.build.kd_loss`) take three or four extra inputs
after the batch and labels: teacher logits [N, num_classes], alpha and temperature (float
scalars) and, in bundles built since it exists, the logit adjustment [num_classes]. The teacher
is the model as received at the start of the hop, evaluated in inference mode once over the local
training set; each step is fed the teacher rows of its batch. The logit adjustment is
``tau * log(prior)`` of the hop's own training labels (:func:`label_log_prior`). Feeding alpha = 0,
zero teacher logits and a zero adjustment makes the loss plain cross-entropy, which is how
evaluation and the teacher pass itself run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from edge_agent.data import Inputs
from edge_agent.protocol.manifest import SegmentManifest
from edge_agent.trainer import TrainerError, TrainSpec

logger = logging.getLogger(__name__)

TEACHER_BATCH = 256  # rows per teacher (eval graph) run


def check_kd(manifest: SegmentManifest, spec: TrainSpec) -> bool:
    """Whether this hop distils; TrainerError for a bad alpha/T or a bundle built without KD."""
    if spec.kd_alpha < 0 or not np.isfinite(spec.kd_alpha):
        raise TrainerError(f"kd_alpha must be finite and >= 0, got {spec.kd_alpha}")
    if spec.kd_temperature <= 0 or not np.isfinite(spec.kd_temperature):
        raise TrainerError(f"kd_temperature must be finite and > 0, got {spec.kd_temperature}")
    if spec.kd_alpha > 0 and not manifest.kd:
        raise TrainerError("kd_alpha > 0 needs a knowledge-distillation bundle (built with kd=True)")
    if spec.logit_adjust < 0 or not np.isfinite(spec.logit_adjust):
        raise TrainerError(f"logit_adjust must be finite and >= 0, got {spec.logit_adjust}")
    if spec.logit_adjust > 0 and not manifest.logit_adjust:
        raise TrainerError(
            "logit_adjust > 0 needs a bundle whose loss takes a logit adjustment (kd=True, this version)"
        )
    return spec.kd_alpha > 0


def label_log_prior(y: np.ndarray, num_classes: int) -> np.ndarray:
    """log of the label frequencies of ``y`` [N] with one pseudo-count per class (a class the hop does not
    hold gets log(1 / (N + C)): its score is barely pushed down by the adjusted cross-entropy)."""
    counts = np.bincount(np.asarray(y, np.int64).ravel(), minlength=num_classes)[:num_classes].astype(np.float64)
    prior: np.ndarray = np.log((counts + 1.0) / (counts.sum() + num_classes)).astype(np.float32)
    return prior


def kd_extras(
    manifest: SegmentManifest,
    rows: int,
    teacher: np.ndarray | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    adjust: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The KD inputs of one run by name ({} for a non-KD bundle); no teacher -> zeros and alpha must be 0;
    no ``adjust`` -> a zero logit adjustment (where the bundle takes one)."""
    if not manifest.kd:
        return {}
    if teacher is None:
        teacher = np.zeros((rows, manifest.num_classes), np.float32)
    teacher_name, alpha_name, temperature_name = manifest.kd_inputs[:3]
    out = {
        teacher_name: np.ascontiguousarray(teacher, dtype=np.float32),
        alpha_name: np.asarray(alpha, dtype=np.float32),
        temperature_name: np.asarray(temperature, dtype=np.float32),
    }
    if manifest.logit_adjust:
        zero = np.zeros(manifest.num_classes, np.float32)
        out[manifest.kd_inputs[3]] = zero if adjust is None else np.ascontiguousarray(adjust, dtype=np.float32)
    return out


def step_extras(
    manifest: SegmentManifest,
    spec: TrainSpec,
    teacher: np.ndarray | None,
    idx: np.ndarray,
    adjust: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The KD inputs of the training step over the batch ``idx``: the teacher's rows with ``spec``'s alpha
    and temperature (no distillation when ``teacher`` is None) and the logit adjustment ``adjust``."""
    if teacher is None:
        return kd_extras(manifest, len(idx), adjust=adjust)
    return kd_extras(manifest, len(idx), teacher[idx], spec.kd_alpha, spec.kd_temperature, adjust)


def step_adjust(manifest: SegmentManifest, spec: TrainSpec, y: np.ndarray) -> np.ndarray | None:
    """The hop's logit adjustment, ``spec.logit_adjust * log(prior of y)``, or None when it is off."""
    if spec.logit_adjust <= 0:
        return None
    return (np.float32(spec.logit_adjust) * label_log_prior(y, manifest.num_classes)).astype(np.float32)


def teacher_logits(
    logits_of: Callable[[np.ndarray, np.ndarray], np.ndarray], x: Inputs, y: np.ndarray, batch: int = TEACHER_BATCH
) -> np.ndarray:
    """Logits [N, num_classes] of every sample, from ``logits_of(xb, yb)`` run in batches of ``batch`` rows
    (trainers pass their training batch size: a larger teacher pass would be the hop's memory peak)."""
    size = max(1, batch)
    parts = [logits_of(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]
    logger.debug("teacher logits for %d samples", len(x))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
