"""Per-segment training artifact bundles, built once and cached by content.

A segment's trainable set is baked into its training graph, so each distinct
(forward model, trainable set, optimizer, KD or not) gets its own bundle. Bundles are cached
under ``cache_dir/<key>/`` where the key hashes exactly those inputs; generation
is deterministic, so the bundle's sha256 (of :func:`coordinator.build.bundle.pack_dir`)
is stable across runs too. Generation itself is the torch-free
:func:`coordinator.build.ort_artifacts.generate_segment`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.build.bundle import fill_atomically, pack_dir
from coordinator.build.ort_artifacts import ArtifactError, generate_segment
from coordinator.build.split_artifacts import generate_front
from coordinator.errors import CoordinatorError
from coordinator.export import ForwardModel
from edge_agent.errors import EdgeAgentError
from edge_agent.protocol.manifest import FORMAT_VERSION, MANIFEST_NAME, OPTIMIZERS, read_manifest
from edge_agent.protocol.transfer import sha256_hex

logger = logging.getLogger(__name__)


class SegmentArtifactError(CoordinatorError):
    """A segment's artifacts cannot be built (unknown names, bad optimizer, generator failure)."""


@dataclass(frozen=True)
class SegmentArtifacts:
    sha256: str  # of ``blob``: the name the bundle travels and is cached under
    directory: Path  # unpacked bundle (cache entry)
    blob: bytes  # pack_dir(directory)
    trainable: tuple[str, ...]  # trainable parameter names, forward order


def artifact_key(
    forward_onnx: bytes, trainable: Sequence[str], optimizer: str, kd: bool = False, task: str = "classify"
) -> str:
    """Cache key: sha256 of the forward ONNX bytes, the sorted trainable set, optimizer, format (and KD)."""
    digest = hashlib.sha256()
    digest.update(forward_onnx)
    digest.update(b"\0" + "\n".join(sorted(set(trainable))).encode())
    digest.update(b"\0" + optimizer.encode() + b"\0" + str(FORMAT_VERSION).encode())
    if kd:  # non-KD keys stay as they were; "+la": the graphs take the logit adjustment too
        digest.update(b"\0kd+la")
    if task != "classify":  # so do classifier keys
        digest.update(b"\0task=" + task.encode())
    return digest.hexdigest()


def _segment_buffers(forward: ForwardModel, trainable: Sequence[str]) -> tuple[str, ...]:
    """Buffers of every group that has a trainable parameter."""
    wanted = set(trainable)
    touched = [group.name for group in forward.groups if wanted & set(group.params)]
    return forward.buffers_of(touched)


def _check_request(forward: ForwardModel, trainable: Sequence[str], optimizer: str) -> tuple[str, ...]:
    if optimizer not in OPTIMIZERS:
        raise SegmentArtifactError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    params = {name for group in forward.groups for name in group.params}
    unknown = sorted(set(trainable) - params)
    if unknown:
        raise SegmentArtifactError(f"not trainable parameters of the model: {unknown}")
    if not trainable:
        raise SegmentArtifactError("a segment needs at least one trainable parameter")
    wanted = set(trainable)
    return tuple(name for name in forward.order if name in wanted)


def _generate(forward: ForwardModel, trainable: tuple[str, ...], optimizer: str, target: Path, kd: bool) -> None:
    def fill(staging: Path) -> None:
        generate_segment(
            forward.onnx_path,
            trainable,
            staging,
            optimizer=optimizer,
            buffers=forward.buffers,
            segment_buffers=_segment_buffers(forward, trainable),
            num_classes=forward.num_classes,
            input_name=forward.input_name,
            logits_name=forward.output_name,
            kd=kd,
            task=forward.task,
        )

    try:
        fill_atomically(target, fill)
    except (ArtifactError, EdgeAgentError) as exc:
        raise SegmentArtifactError(f"cannot build artifacts: {exc}") from exc


def packed(directory: Path, trainable: tuple[str, ...], kind: str) -> SegmentArtifacts:
    """A built bundle directory as bytes, digest and description."""
    blob = pack_dir(directory)
    sha = sha256_hex(blob)
    logger.info("%s segment bundle %s: %d trainable tensors, %d bytes", kind, sha[:12], len(trainable), len(blob))
    return SegmentArtifacts(sha256=sha, directory=directory, blob=blob, trainable=trainable)


def build_segment_artifacts(
    forward: ForwardModel, trainable: Sequence[str], cache_dir: Path, optimizer: str = "adamw", kd: bool = False
) -> SegmentArtifacts:
    """The artifact bundle of the segment that trains ``trainable`` (parameter names); cached.

    ``optimizer``: "adamw" (torch defaults: betas 0.9/0.999, eps 1e-8, weight decay 0.01)
    or "sgd" (no momentum). The learning rate is set at run time. ``kd``: the loss is
    CE + knowledge distillation, alpha and T fed at run time (:mod:`coordinator.build.kd_loss`).
    """
    ordered = _check_request(forward, trainable, optimizer)
    key = artifact_key(Path(forward.onnx_path).read_bytes(), ordered, optimizer, kd, forward.task)
    directory = Path(cache_dir) / key
    if (directory / MANIFEST_NAME).is_file():
        logger.debug("artifact cache hit %s", key[:12])
    else:
        _generate(forward, ordered, optimizer, directory, kd)
    return packed(directory, ordered, "ort")


def build_front_artifacts(front_onnx: Path, cache_dir: Path, optimizer: str = "adamw") -> SegmentArtifacts:
    """The bundle that trains a split-learning front (every parameter of ``front_onnx``) from dL/dA; cached."""
    if optimizer not in OPTIMIZERS:
        raise SegmentArtifactError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    digest = hashlib.sha256(Path(front_onnx).read_bytes())
    digest.update(b"\0split-front+probe\0" + optimizer.encode() + b"\0" + str(FORMAT_VERSION).encode())
    directory = Path(cache_dir) / digest.hexdigest()

    def fill(staging: Path) -> None:
        generate_front(front_onnx, staging, optimizer=optimizer)

    if not (directory / MANIFEST_NAME).is_file():
        try:
            fill_atomically(directory, fill)
        except (ArtifactError, EdgeAgentError) as exc:
            raise SegmentArtifactError(f"cannot build the split front's artifacts: {exc}") from exc
    return packed(directory, read_manifest(directory).trainable, "split front")
