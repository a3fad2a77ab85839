"""Checks every trainer backend applies to weights, data and train specs (numpy only).

Same rules and messages as :class:`edge_agent.ort_trainer.OrtTrainer`, so the
backends accept and refuse the same things.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from edge_agent.data import Images, Inputs
from edge_agent.protocol.manifest import SegmentManifest
from edge_agent.trainer import TrainerError, TrainSpec


def check_tensors(
    manifest: SegmentManifest, tensors: Mapping[str, np.ndarray], copy: bool = True
) -> dict[str, np.ndarray]:
    """Every manifest tensor, checked by name, shape and dtype, as a float32 copy (manifest order);
    ``copy=False``: the given arrays themselves (the caller copies them where it needs them)."""
    missing = [name for name in manifest.order if name not in tensors]
    unknown = sorted(set(tensors) - set(manifest.order))
    if missing or unknown:
        raise TrainerError(
            f"weights do not match the segment: missing {missing[:5]}{'...' * (len(missing) > 5)}"
            f" ({len(missing)}), unknown {unknown[:5]} ({len(unknown)})"
        )
    out: dict[str, np.ndarray] = {}
    for name in manifest.order:
        value = np.asarray(tensors[name])
        if value.shape != manifest.shapes[name]:
            raise TrainerError(f"tensor {name!r} has shape {value.shape}, expected {manifest.shapes[name]}")
        if not np.issubdtype(value.dtype, np.floating):
            raise TrainerError(f"tensor {name!r} has dtype {value.dtype}, expected a float type")
        out[name] = np.array(value, dtype=np.float32, copy=True, order="C") if copy else value
    return out


def check_data(manifest: SegmentManifest, x: Inputs, y: np.ndarray) -> tuple[Inputs, np.ndarray]:
    """Inputs as contiguous float32 [N, *input_shape] (or images converted per batch), labels as int64
    [N] in [0, num_classes)."""
    if not isinstance(x, Images):
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 1 + len(manifest.input_shape) or x.shape[1:] != manifest.input_shape:
        raise TrainerError(f"inputs have shape {x.shape}, expected [N, {', '.join(map(str, manifest.input_shape))}]")
    labels = np.asarray(y)
    if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
        raise TrainerError(f"labels must be integers of shape ({len(x)},), got {labels.dtype} {labels.shape}")
    if len(x) == 0:
        raise TrainerError("no samples")
    if labels.min() < 0 or labels.max() >= manifest.num_classes:
        raise TrainerError(f"labels must lie in [0, {manifest.num_classes})")
    return x, np.ascontiguousarray(labels, dtype=np.int64)


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
