"""The node emitter every lowering rule writes through.

A :class:`Builder` collects the standard-ONNX nodes that replace one graph's
training-only operators, hands out fresh tensor names, and turns small numpy
constants into (deduplicated) initializers. It also knows what the source graph
knows: which node produces a tensor and any static shape it declares.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from coordinator.errors import CoordinatorError

MS_DOMAIN = "com.microsoft"


class LoweringError(CoordinatorError):
    """A training graph cannot be lowered to standard ONNX (unknown operator, unsupported attribute)."""


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """A node attribute's Python value (bytes decoded), or ``default`` when absent."""
    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def has_input(node: onnx.NodeProto, index: int) -> bool:
    """Whether the optional input ``index`` is given (present and not the empty name)."""
    return len(node.input) > index and node.input[index] != ""


def wanted(node: onnx.NodeProto, index: int) -> str | None:
    """Name of output ``index`` if the node declares it, else None."""
    return node.output[index] if len(node.output) > index and node.output[index] else None


class Builder:
    """Collects lowered nodes and constants for one graph."""

    def __init__(self, source: onnx.GraphProto | None = None, opset: int = 17, prefix: str = "lowered") -> None:
        self.opset = opset  # of the default domain: decides between attribute and input forms
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._prefix = prefix
        self._counter = 0
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self._taken: set[str] = set()
        self.producers: dict[str, onnx.NodeProto] = {}
        self.shapes: dict[str, tuple[int | None, ...]] = {}
        self._values: dict[str, onnx.TensorProto] = {}  # initializers and Constant node values
        self.uses_ms_domain = False
        if source is not None:
            self._index(source)

    def _index(self, graph: onnx.GraphProto) -> None:
        for node in graph.node:
            self._taken.update(node.input)
            self._taken.update(node.output)
            for name in node.output:
                if name:
                    self.producers[name] = node
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and attr(node, "value") is not None:
                self._values[node.output[0]] = attr(node, "value")
        for init in graph.initializer:
            self._values[init.name] = init
            self._taken.add(init.name)
            self.shapes[init.name] = tuple(int(d) for d in init.dims)
        for info in [*graph.input, *graph.output, *graph.value_info]:
            self._taken.add(info.name)
            if info.type.tensor_type.HasField("shape"):
                dims = info.type.tensor_type.shape.dim
                self.shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of a source-graph initializer or Constant output, None if it is computed at run time."""
        value = self._values.get(name)
        return None if value is None else numpy_helper.to_array(value)

    def fresh(self, hint: str) -> str:
        """A tensor name used nowhere in the source graph or by earlier lowered nodes."""
        while True:
            self._counter += 1
            name = f"{self._prefix}/{hint}_{self._counter}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, domain: str = "", **attrs: Any) -> str:
        """Emit one single-output node; return its output name (``out`` or a fresh one)."""
        return self.multi(op_type, inputs, [out or self.fresh(op_type)], domain=domain, **attrs)[0]

    def multi(
        self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], domain: str = "", **attrs: Any
    ) -> list[str]:
        """Emit one node with the given outputs (empty names are fine for unused optional outputs)."""
        self._taken.update(outputs)
        name = self.fresh(f"{op_type}_node")
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain, **attrs))
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        return list(outputs)

    def const(self, value: Any, dtype: type | np.dtype[Any] = np.int64) -> str:
        """An initializer holding ``value`` (deduplicated by dtype, shape and bytes); scalars become [1]."""
        return self._initializer(np.ascontiguousarray(np.asarray(value, dtype=dtype)))

    def int_scalar(self, value: int) -> str:
        """A 0-d int64 initializer (for operators that want true scalars, e.g. Range)."""
        return self._initializer(np.array(value, dtype=np.int64))

    def _initializer(self, array: np.ndarray) -> str:
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def scalar(self, value: float) -> str:
        """A float32 scalar constant."""
        return self.const(value, np.float32)

    def reduce(self, op_type: str, data: str, axes: Sequence[int], keepdims: int = 1, out: str | None = None) -> str:
        """ReduceSum/ReduceMean over ``axes``, in the form the graph's opset wants (axes input from 13/18)."""
        since = 13 if op_type == "ReduceSum" else 18
        if self.opset >= since:
            return self.op(op_type, [data, self.const(list(axes))], out, keepdims=keepdims)
        return self.op(op_type, [data], out, axes=list(axes), keepdims=keepdims)

    def identity(self, source: str, out: str) -> str:
        return self.op("Identity", [source], out)

    def shape_slice(self, tensor: str, start: int, end: int | None = None) -> str:
        """``Shape(tensor)[start:end]`` as an int64 vector."""
        if end is None:
            return self.op("Shape", [tensor], start=start)
        return self.op("Shape", [tensor], start=start, end=end)

    def concat_ints(self, parts: Iterable[str]) -> str:
        """Concatenate int64 vectors."""
        return self.op("Concat", list(parts), axis=0)
