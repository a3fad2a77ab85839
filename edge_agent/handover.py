"""A hop's model I/O on the agent: complete a received delta from the cached copy, hand the trained
model on as a delta, and resend the whole model when a receiver asks. Torch-free; the service runs
it in its training worker, the pure ``Agent`` only decides who gets what.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge_agent.model_cache import CachedModel
from edge_agent.protocol import topics
from edge_agent.protocol.codec import as_received
from edge_agent.protocol.delta import (
    INITIAL,
    BaseMismatch,
    Layout,
    advance,
    assemble,
    decode_model,
    digests_of,
    encode_model,
    group_digest,
    model_digest,
    newer,
)
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.messages import HopTask
from edge_agent.trainer import TrainerError

log = logging.getLogger(__name__)


class Cache(Protocol):
    """Where an agent keeps its last model (``ModelCache`` on disk; tests use an in-memory one)."""

    def save(
        self, trial_id: str, hop: int, versions: Mapping[str, int], tensors: Mapping[str, np.ndarray], digest: str
    ) -> None: ...

    def load(self, trial_id: str) -> CachedModel | None: ...


@dataclass
class Loaded:
    tensors: dict[str, np.ndarray]  # the whole model (views into the payload and the cached copy)
    versions: dict[str, int]
    digests: dict[str, str]

    def take_tensors(self) -> dict[str, np.ndarray]:
        """The tensors, forgotten here: pass them on as a temporary so the payload can be freed early."""
        tensors, self.tensors = self.tensors, {}
        return tensors


def load_model(data: bytes, task: HopTask, layout: Layout, cache: Cache, trial_id: str) -> Loaded:
    """The whole model for ``task`` from a payload (and, for a delta, the cached copy). Raises
    BaseMismatch when the cached copy cannot complete it, ProtocolError when the payload is bad."""
    payload, header = decode_model(data)
    if header is None or not layout:  # a plain model: every tensor travelled
        tensors, versions = payload, {g: INITIAL for g in layout}
        digests = digests_of(tensors, layout)
    else:
        cached = None if header.full else cache.load(trial_id)
        tensors = assemble(payload, header, layout, cached.base if cached else None)
        versions, digests = dict(header.versions), dict(header.digests)
    missing = set(task.tensors) - set(tensors)
    if missing:
        raise ProtocolError(
            "malformed", f"model for hop {task.hop} lacks {len(missing)} tensor(s), e.g. {sorted(missing)[0]}"
        )
    return Loaded(tensors, versions, digests)


@dataclass(frozen=True)
class Outbound:
    data: bytes  # for task.next: the groups it lacks
    checkpoint: bytes | None  # the whole model for the coordinator's per-round evaluation


def hand_on(
    task: HopTask,
    trained: Mapping[str, np.ndarray],
    loaded_versions: Mapping[str, int],
    loaded_digests: Mapping[str, str],
    layout: Layout,
    compression: str,
    cache: Cache,
    trial_id: str,
) -> Outbound:
    """Check frozen groups came back bit-identical, keep the model on disk, encode what ``task.next`` needs."""
    for group, names in layout.items():
        if group not in task.groups and group_digest(trained, names) != loaded_digests[group]:
            raise TrainerError(f"the trainer changed frozen layer group {group!r}; refusing to hand it on")
    model = {name: as_received(t, compression) for name, t in trained.items()}
    versions = advance(loaded_versions, task.groups, task.hop, layout)
    digests = {g: (group_digest(model, names) if g in task.groups or compression != "none" else loaded_digests[g])
               for g, names in layout.items()}  # fmt: skip
    if layout:
        cache.save(trial_id, task.hop, versions, model, model_digest(model))
    send = newer(versions, task.next_holds) if layout else []
    data = encode_model(model, layout, versions, digests, send, compression)
    checkpoint = None
    if task.checkpoint and task.next != topics.COORDINATOR:  # the whole model; the same bytes when data is whole
        whole = set(send) == set(layout)
        checkpoint = data if whole else encode_model(model, layout, versions, digests, list(layout), compression)
    log.info("hop %d: handing on %d of %d layer group(s), %d bytes", task.hop, len(send), len(layout), len(data))
    return Outbound(data, checkpoint)


def full_model(cache: Cache, trial_id: str, hop: int, layout: Layout, compression: str) -> bytes:
    """The whole model this agent handed on after ``hop`` (from its cache), for a receiver that asks."""
    cached = cache.load(trial_id)
    if cached is None or cached.hop != hop:
        have = "nothing" if cached is None else f"hop {cached.hop}'s output"
        raise BaseMismatch(f"cannot resend the model of hop {hop}: the cache holds {have}")
    tensors = cached.base.tensors
    if model_digest(tensors) != cached.digest:  # never hand on something other than what was trained
        raise BaseMismatch(f"cannot resend the model of hop {hop}: the cached copy is damaged (digest differs)")
    return encode_model(tensors, layout, cached.base.versions, digests_of(tensors, layout), list(layout), compression)
