"""ONNX external data for models over protobuf's 2 GB limit, streamed one tensor at a time (onnx only, no torch).

A forward model whose float tensors exceed the threshold keeps its graph in ``forward.onnx`` and every
model tensor (the wire-named float initializers) in one raw file next to it, ``forward.onnx.data``,
referenced by (location, offset, length). The tensors are moved one at a time, never the whole model in
memory, whether the exporter wrote them inline (a small model forced over a lowered threshold) or one file
per tensor (torch's exporter does that above 2 GB). :func:`tensor_views` reads them back as read-only
memory maps.

Artifact generation needs only names, shapes and types: the training graphs carry no weights (they live in
the checkpoint, and a nominal checkpoint holds none), so the generator is given the graph with its tensors
left external, never loaded (:mod:`coordinator.build.ort_artifacts`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

PROTOBUF_LIMIT = 2**31  # bytes: protobuf cannot serialize a message of this size or more
GRAPH_HEADROOM = 2**24  # bytes kept for the graph itself (nodes, small constants)
DEFAULT_THRESHOLD = PROTOBUF_LIMIT - GRAPH_HEADROOM  # tensor bytes above which a model goes external
THRESHOLD_ENV = "SNAKE_ONNX_EXTERNAL_BYTES"  # lowers the threshold (tests force small models external)
_ALIGN = 4096  # tensors start on page boundaries, so each one maps cleanly


def external_threshold() -> int:
    """Tensor bytes above which models use external data: ``$SNAKE_ONNX_EXTERNAL_BYTES`` or just under 2 GB."""
    raw = os.environ.get(THRESHOLD_ENV, "").strip()
    if not raw:
        return DEFAULT_THRESHOLD
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{THRESHOLD_ENV} must be a byte count, not {raw!r}") from None
    if not 0 <= value <= DEFAULT_THRESHOLD:
        raise ValueError(f"{THRESHOLD_ENV} must be between 0 and {DEFAULT_THRESHOLD}, not {value}")
    return value


def data_file(onnx_path: Path) -> Path:
    """Where the external tensors of ``onnx_path`` live: ``<name>.data`` next to it."""
    return Path(onnx_path).with_name(Path(onnx_path).name + ".data")


def uses_external_data(proto: onnx.ModelProto) -> bool:
    """Whether any initializer or node attribute tensor of the main graph lives in an external file."""
    tensors = [*proto.graph.initializer, *_attribute_tensors(proto)]
    return any(tensor.data_location == TensorProto.EXTERNAL for tensor in tensors)


def _attribute_tensors(proto: onnx.ModelProto) -> list[TensorProto]:
    found: list[TensorProto] = []
    for node in proto.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                found.append(attribute.t)
    return found


def _external_fields(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _tensor_bytes(tensor: TensorProto, base_dir: Path) -> bytes:
    """The raw bytes of one initializer, inline or external (read from its file, then that file may go)."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(tensor).astype(tensor_dtype(tensor), copy=False).tobytes()
    fields = _external_fields(tensor)
    offset, length = int(fields.get("offset", 0)), fields.get("length")
    with (base_dir / fields["location"]).open("rb") as handle:
        handle.seek(offset)
        return handle.read(int(length)) if length is not None else handle.read()


def tensor_dtype(tensor: TensorProto) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))


def externalize(proto: onnx.ModelProto, onnx_path: Path, names: Iterable[str]) -> int:
    """Move the initializers ``names`` of ``proto`` (saved at ``onnx_path``) into ``<onnx_path>.data``.

    Streams one tensor at a time; per-tensor files an exporter wrote next to the model are deleted
    once copied. Every other initializer is made inline. Returns the data file's size in bytes.
    The caller saves ``proto`` (now small) to ``onnx_path``.
    """
    base_dir = Path(onnx_path).parent
    target = data_file(onnx_path)
    wanted = set(names)
    stale: set[Path] = set()
    if any(_external_fields(t).get("location") == target.name for t in proto.graph.initializer):
        raise ValueError(f"{onnx_path} already keeps its tensors in {target.name}")
    with target.open("wb") as out:
        for tensor in proto.graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL:
                stale.add(base_dir / _external_fields(tensor)["location"])
            raw = _tensor_bytes(tensor, base_dir)
            _clear_data(tensor)
            if tensor.name not in wanted:
                tensor.raw_data = raw
                continue
            out.write(b"\0" * (-out.tell() % _ALIGN))
            offset = out.tell()
            out.write(raw)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", target.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        size = out.tell()
    for tensor in _attribute_tensors(proto):  # e.g. Constant nodes' values: kept in the graph
        if tensor.data_location == TensorProto.EXTERNAL:
            stale.add(base_dir / _external_fields(tensor)["location"])
            raw = _tensor_bytes(tensor, base_dir)
            _clear_data(tensor)
            tensor.raw_data = raw
    for path in stale - {target}:
        path.unlink(missing_ok=True)
    return size


def _clear_data(tensor: TensorProto) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT


def tensor_views(proto: onnx.ModelProto, onnx_path: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Read-only memory maps of the external initializers ``names`` (nothing is read until used)."""
    base_dir = Path(onnx_path).parent
    by_name = {init.name: init for init in proto.graph.initializer}
    views: dict[str, np.ndarray] = {}
    for name in names:
        tensor = by_name[name]
        fields = _external_fields(tensor)
        if tensor.data_location != TensorProto.EXTERNAL or "location" not in fields:
            views[name] = onnx.numpy_helper.to_array(tensor)
            continue
        shape = tuple(int(d) for d in tensor.dims)
        views[name] = np.memmap(
            base_dir / fields["location"],
            dtype=tensor_dtype(tensor),
            mode="r",
            offset=int(fields["offset"]),
            shape=shape,
        )
    return views
