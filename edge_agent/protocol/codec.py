"""Named tensors <-> safetensors bytes, optionally fp16 on the wire.

``tensor_parts`` is the toolkit's one safetensors writer (8-byte header length, JSON header, raw
little-endian data): ``encode_tensors`` joins its parts into a payload with one copy, straight from
the arrays, and a file writer streams them without building the file in memory. ``decode_views``
reads the bytes back without copying (read-only views into the payload, fp16 widened). The bytes
are plain safetensors: any safetensors reader loads them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np

from edge_agent.protocol.errors import ProtocolError

COMPRESSIONS = ("none", "fp16")
_DTYPES: dict[str, np.dtype[np.floating]] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
_MAX_HEADER = 100 << 20


def wire_dtype(compression: str) -> np.dtype:
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; known: {', '.join(COMPRESSIONS)}")
    return np.dtype("<f2") if compression == "fp16" else np.dtype("<f4")


def as_received(t: np.ndarray, compression: str) -> np.ndarray:
    """``t`` as a receiver decodes it (fp16 rounding applied), float32."""
    if compression == "fp16":
        return np.asarray(t, np.float32).astype(np.float16).astype(np.float32)
    return np.asarray(t, np.float32)


def tensor_parts(
    tensors: Mapping[str, np.ndarray], compression: str = "none", metadata: Mapping[str, str] | None = None
) -> list[bytes | memoryview]:
    """The safetensors form of float tensors as consecutive parts: header length and header, then each
    tensor's data (views of the converted arrays, in the mapping's order); ``fp16`` halves the bytes."""
    wire = wire_dtype(compression)
    arrays = {name: np.ascontiguousarray(t, dtype=wire) for name, t in tensors.items()}
    header: dict[str, object] = {"__metadata__": {"compression": compression, **(metadata or {})}}
    offset = 0
    for name, arr in arrays.items():
        code = "F16" if arr.dtype == np.float16 else "F32"
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    parts: list[bytes | memoryview] = [struct.pack("<Q", len(text)), text]
    parts += [arr.data.cast("B") for arr in arrays.values() if arr.nbytes]
    return parts


def encode_tensors(
    tensors: Mapping[str, np.ndarray], compression: str = "none", metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise float tensors; ``fp16`` halves the bytes at a precision cost."""
    return b"".join(tensor_parts(tensors, compression, metadata))


def decode_views(data: bytes | memoryview) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) without copying float32 data: read-only views into ``data``."""
    view = memoryview(data)
    if len(view) < 8:
        raise ProtocolError("malformed", "tensor payload is not valid safetensors: shorter than its header")
    (size,) = struct.unpack_from("<Q", view, 0)
    if size > min(_MAX_HEADER, len(view) - 8):
        raise ProtocolError("malformed", f"tensor payload is not valid safetensors: header of {size} bytes")
    try:
        header = json.loads(bytes(view[8 : 8 + size]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("malformed", f"tensor payload is not valid safetensors: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "tensor payload is not valid safetensors: header is not an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ProtocolError("malformed", "tensor payload metadata must map strings to strings")
    body = view[8 + size :]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        out[name] = _tensor(name, info, body)
    return out, meta


def _tensor(name: str, info: object, body: memoryview) -> np.ndarray:
    try:
        assert isinstance(info, dict)
        dtype = _DTYPES.get(str(info["dtype"]))
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (AssertionError, KeyError, TypeError, ValueError) as exc:
        raise ProtocolError("malformed", f"tensor {name!r}: malformed header entry") from exc
    if dtype is None:
        raise ProtocolError("malformed", f"tensor {name!r} has dtype {info['dtype']}, expected F32/F16")
    count = int(np.prod(shape, dtype=np.int64))
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(body) or end - begin != count * dtype.itemsize:
        raise ProtocolError("malformed", f"tensor {name!r}: data offsets do not match its shape")
    arr: np.ndarray = np.frombuffer(body, dtype=dtype, count=count, offset=begin).reshape(shape)
    return arr.astype(np.float32) if dtype == np.float16 else arr


def decode_tensors(data: bytes) -> dict[str, np.ndarray]:
    """Deserialise to writable float32 arrays (copies); malformed bytes raise ProtocolError."""
    tensors, _ = decode_views(data)
    return {name: np.array(t, dtype=np.float32) for name, t in tensors.items()}
