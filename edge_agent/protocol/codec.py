"""Named tensors <-> safetensors bytes, optionally fp16 on the wire."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from edge_agent.protocol.errors import ProtocolError

COMPRESSIONS = ("none", "fp16")


def encode_tensors(
    tensors: Mapping[str, np.ndarray], compression: str = "none", metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise float tensors; ``fp16`` halves the bytes at a precision cost."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; known: {', '.join(COMPRESSIONS)}")
    wire = np.float16 if compression == "fp16" else np.float32
    arrays = {name: np.ascontiguousarray(t, dtype=wire) for name, t in tensors.items()}
    meta = {"compression": compression, **(metadata or {})}
    return save(arrays, metadata=meta)


def decode_tensors(data: bytes) -> dict[str, np.ndarray]:
    """Deserialise to float32 arrays; malformed bytes raise ProtocolError."""
    try:
        arrays = load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise ProtocolError("malformed", f"tensor payload is not valid safetensors: {exc}") from exc
    out: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        if arr.dtype not in (np.float32, np.float16):
            raise ProtocolError("malformed", f"tensor {name!r} has dtype {arr.dtype}, expected float32/float16")
        out[name] = arr.astype(np.float32, copy=False)
    return out
