"""Layer-group versions: only what changed travels. Pure (numpy and hashlib).

A model's bookkeeping is, per layer group, a **version** (the global hop that last trained the
group; ``INITIAL`` for the exported model) and a sha256 **digest** of its parameters. A sender
includes the parameters of every group newer than the copy the receiver holds (``holds``, which the
coordinator derives from the plan) plus every buffer: BatchNorm running statistics change on every
hop in every layer (frozen layers run in training mode), and they are ~0.1 % of a CNN, so buffers
always travel. The payload's safetensors metadata names the versions, digests and the groups it
carries. The receiver fills the other groups from its cached copy after checking each one's version
and digest; a missing or different copy raises :class:`BaseMismatch` and the receiver asks for the
whole model, so a wrong base is never used silently. An empty layout means "no groups": every
tensor travels every time (FedAvg).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.protocol.codec import decode_views, encode_tensors
from edge_agent.protocol.errors import ProtocolError

INITIAL = -1
Layout = Mapping[str, Sequence[str]]  # layer group -> its parameter names, in model order
_KEY = "snake.model"


class BaseMismatch(ProtocolError):
    """The receiver's cached copy is missing or is not the one a delta was computed against."""

    def __init__(self, message: str) -> None:
        super().__init__("base_mismatch", message)


@dataclass(frozen=True)
class ModelHeader:
    versions: dict[str, int]  # group -> version of the model this payload describes
    digests: dict[str, str]  # group -> sha256 of its parameters (float32 as decoded)
    sent: tuple[str, ...]  # groups whose parameters the payload carries

    @property
    def full(self) -> bool:
        return set(self.sent) >= set(self.versions)

    def metadata(self) -> dict[str, str]:
        header = {"versions": self.versions, "digests": self.digests, "sent": list(self.sent)}
        return {_KEY: json.dumps(header, sort_keys=True)}  # canonical: the same header, the same bytes

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> ModelHeader | None:
        text = meta.get(_KEY)
        if text is None:
            return None
        try:
            raw = json.loads(text)
            versions = {str(g): int(v) for g, v in raw["versions"].items()}
            digests = {str(g): str(d) for g, d in raw["digests"].items()}
            sent = tuple(str(g) for g in raw["sent"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ProtocolError("malformed", f"model header is malformed: {exc}") from exc
        if set(digests) != set(versions) or not set(sent) <= set(versions):
            raise ProtocolError("malformed", "model header: versions, digests and sent groups disagree")
        return cls(versions, digests, sent)


def group_digest(tensors: Mapping[str, np.ndarray], names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        arr = np.ascontiguousarray(tensors[name], dtype=np.float32)
        h.update(name.encode() + b"\0" + str(arr.shape).encode() + b"\0")
        h.update(arr.data.cast("B"))
    return h.hexdigest()


def digests_of(tensors: Mapping[str, np.ndarray], layout: Layout) -> dict[str, str]:
    return {group: group_digest(tensors, names) for group, names in layout.items()}


def model_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 of every tensor (parameters and buffers), by name: what a cached copy is checked against."""
    return group_digest(tensors, sorted(tensors))


def advance(versions: Mapping[str, int], trained: Sequence[str], hop: int, layout: Layout) -> dict[str, int]:
    """Versions after ``hop`` trained the groups ``trained`` (groups unknown so far start at INITIAL)."""
    out = {group: versions.get(group, INITIAL) for group in layout}
    out.update({group: hop for group in trained if group in layout})
    return out


def newer(versions: Mapping[str, int], holds: Mapping[str, int]) -> list[str]:
    """Groups the receiver lacks: absent from ``holds`` or newer than its version there."""
    return [g for g, v in versions.items() if g not in holds or v > holds[g]]


def encode_model(
    tensors: Mapping[str, np.ndarray],
    layout: Layout,
    versions: Mapping[str, int],
    digests: Mapping[str, str],
    send: Sequence[str],
    compression: str = "none",
) -> bytes:
    """The parameters of the groups ``send`` and every tensor outside the layout, with a header."""
    in_groups = {name for names in layout.values() for name in names}
    wanted = {name for g in send for name in layout[g]}
    picked = {n: t for n, t in tensors.items() if n in wanted or n not in in_groups}
    header = ModelHeader(dict(versions), dict(digests), tuple(g for g in layout if g in set(send)))
    return encode_tensors(picked, compression, header.metadata())


def decode_model(data: bytes) -> tuple[dict[str, np.ndarray], ModelHeader | None]:
    """Payload tensors (read-only views) and the header; None for a plain model (every tensor present)."""
    tensors, meta = decode_views(data)
    return tensors, ModelHeader.from_metadata(meta)


@dataclass(frozen=True)
class Base:
    """A cached copy: its group versions and every tensor."""

    versions: Mapping[str, int]
    tensors: Mapping[str, np.ndarray]


def assemble(
    payload: Mapping[str, np.ndarray], header: ModelHeader, layout: Layout, base: Base | None
) -> dict[str, np.ndarray]:
    """The whole model: ``payload`` plus the unsent groups from ``base``, each checked by version and digest."""
    if set(header.versions) != set(layout):
        raise ProtocolError("malformed", "model header names other layer groups than the trial's layout")
    model = dict(payload)
    for group in header.sent:
        missing = [n for n in layout[group] if n not in payload]
        if missing:
            raise ProtocolError("malformed", f"model payload lacks {missing[0]!r} of group {group!r}")
    unsent = [g for g in layout if g not in set(header.sent)]
    if unsent and base is None:
        raise BaseMismatch(f"no cached copy to fill {len(unsent)} group(s) the sender left out")
    for group in unsent:
        assert base is not None
        have = base.versions.get(group)
        if have != header.versions[group]:
            raise BaseMismatch(f"cached copy has group {group!r} at version {have}, expected {header.versions[group]}")
        if any(n not in base.tensors for n in layout[group]):
            raise BaseMismatch(f"cached copy lacks tensors of group {group!r}")
        if group_digest(base.tensors, layout[group]) != header.digests[group]:
            raise BaseMismatch(f"cached copy of group {group!r} differs from the sender's (digest)")
        model.update({n: base.tensors[n] for n in layout[group]})
    for group in header.sent:
        if group_digest(model, layout[group]) != header.digests[group]:
            raise ProtocolError("malformed", f"group {group!r} does not match its digest in the model header")
    if base is not None:
        lost = [n for n in base.tensors if n not in model]
        if lost:
            raise ProtocolError("malformed", f"model payload lacks {lost[0]!r} (every buffer travels every hop)")
    return model
