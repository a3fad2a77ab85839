"""Checks every trainer backend applies to weights and data (numpy only).

Same rules and messages as :class:`edge_agent.ort_trainer.OrtTrainer`, so the
backends accept and refuse the same things.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from edge_agent.data import Images, Inputs
from edge_agent.protocol.manifest import IGNORE_INDEX, ManifestError, SegmentManifest, read_manifest
from edge_agent.trainer import TrainerError


def check_tensors(manifest: SegmentManifest, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every manifest tensor, checked by name, shape and dtype, as a float32 copy (manifest order)."""
    return {
        name: np.array(value, dtype=np.float32, copy=True, order="C")
        for name, value in checked_tensors(manifest, tensors)
    }


def checked_tensors(manifest: SegmentManifest, tensors: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every manifest tensor in manifest order, each checked by shape and dtype as it is
    taken from ``tensors``; the names are checked before the first is taken."""
    missing = [name for name in manifest.order if name not in tensors]
    unknown = sorted(set(tensors) - set(manifest.order))
    if missing or unknown:
        raise TrainerError(
            f"weights do not match the segment: missing {missing[:5]}{'...' * (len(missing) > 5)}"
            f" ({len(missing)}), unknown {unknown[:5]} ({len(unknown)})"
        )
    return _checked_values(manifest, tensors)


def _checked_values(manifest: SegmentManifest, tensors: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    for name in manifest.order:
        value = np.asarray(tensors[name])
        if value.shape != manifest.shapes[name]:
            raise TrainerError(f"tensor {name!r} has shape {value.shape}, expected {manifest.shapes[name]}")
        if not np.issubdtype(value.dtype, np.floating):
            raise TrainerError(f"tensor {name!r} has dtype {value.dtype}, expected a float type")
        yield name, value
        del value  # not kept while the next one is read


def manifest_floats(manifest: SegmentManifest) -> int:
    """How many floats the segment's tensors hold."""
    return int(sum(np.prod(manifest.shapes[name], dtype=np.int64) for name in manifest.order))


def open_manifest(directory: Path) -> SegmentManifest:
    """The manifest of the bundle in ``directory``; TrainerError when it is missing or malformed."""
    try:
        return read_manifest(directory)
    except ManifestError as exc:
        raise TrainerError(str(exc)) from exc


def check_tokens(manifest: SegmentManifest, x: Inputs, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A language model's batch: token ids int64 [N, T] in [0, vocab), next-token labels int64 [N, T]
    in [0, vocab) or IGNORE_INDEX (no target, e.g. padding)."""
    tokens, labels = np.asarray(x), np.asarray(y)
    shape = (len(tokens), *manifest.input_shape)
    if isinstance(x, Images) or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape != shape:
        raise TrainerError(f"tokens must be integers of shape [N, {manifest.input_shape[0]}], got {tokens.shape}")
    if labels.shape != shape or not np.issubdtype(labels.dtype, np.integer):
        raise TrainerError(f"labels must be integers of shape {shape}, got {labels.dtype} {labels.shape}")
    if len(tokens) == 0:
        raise TrainerError("no samples")
    vocab = manifest.num_classes
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise TrainerError(f"token ids must lie in [0, {vocab})")
    if np.any(((labels < 0) | (labels >= vocab)) & (labels != IGNORE_INDEX)):
        raise TrainerError(f"labels must lie in [0, {vocab}) or be {IGNORE_INDEX}")
    return np.ascontiguousarray(tokens, dtype=np.int64), np.ascontiguousarray(labels, dtype=np.int64)


def check_data(manifest: SegmentManifest, x: Inputs, y: np.ndarray) -> tuple[Inputs, np.ndarray]:
    """Inputs as contiguous float32 [N, *input_shape] (or images converted per batch), labels as int64
    [N] in [0, num_classes) (a split front has no classes: the coordinator's back checks its labels).
    A language model's bundle (task "causal-lm") takes token ids instead: :func:`check_tokens`."""
    if manifest.task == "causal-lm":
        return check_tokens(manifest, x, y)
    if not isinstance(x, Images):
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 1 + len(manifest.input_shape) or x.shape[1:] != manifest.input_shape:
        raise TrainerError(f"inputs have shape {x.shape}, expected [N, {', '.join(map(str, manifest.input_shape))}]")
    labels = np.asarray(y)
    if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
        raise TrainerError(f"labels must be integers of shape ({len(x)},), got {labels.dtype} {labels.shape}")
    if len(x) == 0:
        raise TrainerError("no samples")
    if manifest.num_classes and (labels.min() < 0 or labels.max() >= manifest.num_classes):
        raise TrainerError(f"labels must lie in [0, {manifest.num_classes})")
    return x, np.ascontiguousarray(labels, dtype=np.int64)
