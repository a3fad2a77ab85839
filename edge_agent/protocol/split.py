"""Split learning on the wire: per-batch activations (agent -> coordinator) and gradients (back).

Both travel as ordinary chunked, digest-checked transfers (:mod:`edge_agent.protocol.transfer`)
with their own purposes, so chunk limits, acknowledgements, resends and byte accounting are
the model transfers' own. Payloads are safetensors (:mod:`edge_agent.protocol.codec`, fp16 when
the trial compresses); the meta names the hop and the batch's sequence number within the hop,
which makes every handler idempotent under QoS 1 duplicates.

    activations  meta {"hop", "round", "seq"}    tensors {"activations": A [N, ...], "labels": [N]}
    gradients    meta {"hop", "seq", "loss"}     tensors {"gradient": dL/dA, shaped like A}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edge_agent.protocol.codec import decode_tensors, encode_tensors
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.kinds import Purpose

ACTIVATIONS = Purpose.ACTIVATIONS  # transfer purpose
GRADIENTS = Purpose.GRADIENTS  # transfer purpose
MAX_LABEL = 2048  # labels travel as floats: exact up to here even in fp16


def encode_activations(activations: np.ndarray, labels: np.ndarray, compression: str = "none") -> bytes:
    labels = np.asarray(labels)
    if labels.shape != (len(activations),) or (len(labels) and not 0 <= labels.min() <= labels.max() < MAX_LABEL):
        raise ValueError(f"labels must be {len(activations)} integers in [0, {MAX_LABEL})")
    return encode_tensors({"activations": activations, "labels": labels.astype(np.float32)}, compression)


def decode_activations(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(activations float32 [N, ...], labels int64 [N]); ProtocolError for anything else."""
    tensors = decode_tensors(data)
    if set(tensors) != {"activations", "labels"}:
        raise ProtocolError("malformed", f"activations payload holds {sorted(tensors)}, not activations and labels")
    activations, labels = tensors["activations"], tensors["labels"]
    if activations.ndim < 2 or labels.shape != (len(activations),) or not len(labels):
        raise ProtocolError("malformed", f"activations {activations.shape} and labels {labels.shape} do not match")
    if not (np.all(np.isfinite(activations)) and np.array_equal(labels, np.round(labels)) and labels.min() >= 0):
        raise ProtocolError("malformed", "activations are not finite or labels are not non-negative integers")
    return activations, labels.astype(np.int64)


def encode_gradient(gradient: np.ndarray, compression: str = "none") -> bytes:
    return encode_tensors({"gradient": gradient}, compression)


def decode_gradient(data: bytes) -> np.ndarray:
    tensors = decode_tensors(data)
    if set(tensors) != {"gradient"}:
        raise ProtocolError("malformed", f"gradient payload holds {sorted(tensors)}, not gradient")
    return tensors["gradient"]


def batch_meta(hop: int, seq: int, **extra: Any) -> dict[str, Any]:
    return {"hop": hop, "seq": seq, **extra}


def parse_batch(meta: Mapping[str, Any]) -> tuple[int, int]:
    """(hop, seq) of an activations/gradients transfer; ProtocolError when missing or not integers >= 0."""
    hop, seq = meta.get("hop"), meta.get("seq")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (hop, seq))
    if not ok:
        raise ProtocolError("malformed", f"batch transfer names hop {hop!r} and seq {seq!r}")
    return int(hop), int(seq)  # type: ignore[arg-type]
