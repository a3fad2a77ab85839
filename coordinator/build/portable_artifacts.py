"""Per-segment portable bundles (for agents with plain onnxruntime), built once and cached by content.

The same conventions as :mod:`coordinator.build.artifacts`: one bundle per (forward model,
trainable set, optimizer), cached under ``cache_dir/<key>/`` with a key distinct from
the ORT bundle's, deterministic bytes, so a stable sha256. Building one first builds
(or reuses) the segment's ORT artifacts in the same cache, then lowers them
(:func:`coordinator.build.lowering.lower_segment`), which also checks that both graphs load
in onnxruntime.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

from coordinator.build.artifacts import (
    SegmentArtifactError,
    SegmentArtifacts,
    _check_request,
    artifact_key,
    build_segment_artifacts,
    packed,
)
from coordinator.build.bundle import fill_atomically
from coordinator.build.lowering import LoweringError, lower_segment
from coordinator.export import ForwardModel
from edge_agent.protocol.manifest import MANIFEST_NAME

logger = logging.getLogger(__name__)

LOWERING_VERSION = 1  # bump when the lowering's output changes: old cache entries are then rebuilt


def portable_key(forward_onnx: bytes, trainable: Sequence[str], optimizer: str, kd: bool = False) -> str:
    """Cache key of a portable bundle: the ORT bundle's key, the bundle kind and the lowering version."""
    ort_key = artifact_key(forward_onnx, trainable, optimizer, kd)
    return hashlib.sha256(f"{ort_key}\0portable\0{LOWERING_VERSION}".encode()).hexdigest()


def _lower_into(source: Path, target: Path) -> None:
    try:
        fill_atomically(target, lambda staging: lower_segment(source, staging))
    except LoweringError as exc:
        raise SegmentArtifactError(f"cannot lower the segment for plain onnxruntime: {exc}") from exc


def build_portable_artifacts(
    forward: ForwardModel, trainable: Sequence[str], cache_dir: Path, optimizer: str = "adamw", kd: bool = False
) -> SegmentArtifacts:
    """The portable bundle of the segment that trains ``trainable`` (parameter names); cached.

    ``optimizer`` as for :func:`coordinator.build.artifacts.build_segment_artifacts`; the device
    applies it in numpy (:mod:`edge_agent.optim`); ``kd`` as there too.
    """
    ordered = _check_request(forward, trainable, optimizer)
    key = portable_key(Path(forward.onnx_path).read_bytes(), ordered, optimizer, kd)
    directory = Path(cache_dir) / key
    if (directory / MANIFEST_NAME).is_file():
        logger.debug("portable artifact cache hit %s", key[:12])
    else:
        source = build_segment_artifacts(forward, ordered, cache_dir, optimizer, kd)
        _lower_into(source.directory, directory)
    return packed(directory, ordered, "portable")
