"""Indexing gradients: SliceGrad (a slice's gradient: zeros around dY) and GatherGrad (an embedding's
gradient: rows of dY added into zeros at the gathered indices, duplicates summed).

Both read the forward input's shape at run time (a ``Shape`` output in ORT's graphs), so they hold
for any batch and sequence length.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from coordinator.build.lowering.builder import Builder, LoweringError, attr, has_input

_END = int(np.iinfo(np.int64).max)  # Slice end meaning "to the end of the axis"
_ZERO = np.zeros(1, np.int64)


def _product(b: Builder, dims: str) -> str:
    """The product of an int64 vector (1 when empty) as a [1] vector."""
    return b.op("ReduceProd", [b.op("Concat", [b.const([1]), dims], axis=0)], keepdims=1)


def _zeros_like_type(b: Builder, like: str, shape: str) -> str:
    """Zeros of ``shape`` with the element type of ``like``."""
    if b.opset < 15:
        raise LoweringError(f"this gradient needs opset >= 15 (CastLike), the graph has {b.opset}")
    return b.op("Expand", [b.op("CastLike", [b.scalar(0.0), like]), shape])


def _slice_axes(b: Builder, node: onnx.NodeProto, rank: str) -> str:
    """The axes input (default 0..len(starts)-1), negative axes counted from ``rank``."""
    if has_input(node, 4):
        axes = node.input[4]
    else:
        count = b.op("Squeeze", [b.op("Shape", [node.input[2]]), b.const([0])])
        axes = b.op("Range", [b.int_scalar(0), count, b.int_scalar(1)])
    negative = b.op("Less", [axes, b.const(0)])
    return b.op("Where", [negative, b.op("Add", [axes, rank]), axes])


def _clamped(b: Builder, bound: str, dims: str) -> str:
    """A slice bound as an index in [0, dim]: negative ones count from the end, then clamped."""
    inside = b.op("Max", [b.op("Min", [bound, dims]), b.op("Neg", [dims])])  # [-dim, dim]: no overflow below
    negative = b.op("Less", [inside, b.const(0)])
    return b.op("Where", [negative, b.op("Add", [inside, dims]), inside])


def _unit_steps(b: Builder, node: onnx.NodeProto) -> bool:
    """Whether every step is 1 (no steps input, or a constant of ones)."""
    if not has_input(node, 5):
        return True
    value = b.constant_value(node.input[5])
    return value is not None and bool(np.all(value == 1))


def slice_grad(b: Builder, node: onnx.NodeProto) -> None:
    """SliceGrad(dY, shape, starts, ends[, axes][, steps]) -> dX: dY where the slice took its elements, else 0.

    Unit steps: one Pad of dY (pads from the normalised, clamped bounds); other steps: dY scattered
    into zeros at the flat positions of a slice of 0..size-1.
    """
    if not _unit_steps(b, node):
        _strided_slice_grad(b, node)
        return
    dy, shape, starts, ends = node.input[:4]
    rank = b.op("Shape", [shape])  # [1]
    axes = _slice_axes(b, node, rank)
    dims = b.op("Gather", [shape, axes], axis=0)
    begin = _clamped(b, starts, dims)
    end = b.op("Max", [_clamped(b, ends, dims), begin])  # an empty slice pads on one side only
    after = b.op("Sub", [dims, end])
    zeros = b.op("ConstantOfShape", [b.op("Mul", [rank, b.const([2])])], value=numpy_helper.from_array(_ZERO))
    where = b.op("Concat", [axes, b.op("Add", [axes, rank])], axis=0)  # begin pads, then end pads
    pads = b.op("ScatterElements", [zeros, where, b.op("Concat", [begin, after], axis=0)], axis=0)
    b.op("Pad", [dy, pads], node.output[0])


def _strided_slice_grad(b: Builder, node: onnx.NodeProto) -> None:
    dy, shape = node.input[:2]
    size = _product(b, shape)  # [1]
    count = b.op("Squeeze", [size, b.const([0])])
    positions = b.op("Reshape", [b.op("Range", [b.int_scalar(0), count, b.int_scalar(1)]), shape])
    taken = b.op("Slice", [positions, *node.input[2:]])  # the same slice of the flat positions
    flat = b.op("Reshape", [taken, b.const([-1])])
    values = b.op("Reshape", [dy, b.const([-1])])
    scattered = b.op("ScatterElements", [_zeros_like_type(b, dy, size), flat, values], axis=0)
    b.op("Reshape", [scattered, shape], node.output[0])


def gather_grad(b: Builder, node: onnx.NodeProto) -> None:
    """GatherGrad(shape, indices, dY) -> dX: zeros of ``shape``, dY's slices added at ``indices`` along ``axis``.

    Axis 0 (an embedding): one ScatterND with reduction "add" (repeated indices sum, as in ORT's kernel).
    Other axes work on [prefix, dim, suffix] views: dY as [prefix, len(indices), suffix], the indices
    broadcast to it, one ScatterElements with reduction "add".
    """
    if b.opset < 16:
        raise LoweringError(f"GatherGrad needs opset >= 16 (ScatterElements with reduction), the graph has {b.opset}")
    shape, indices, dy = node.input[:3]
    axis = int(attr(node, "axis", 0))
    if axis == 0:  # an embedding: dY's rows go to the indexed rows, without broadcasting the indices
        rows = b.op("Unsqueeze", [indices, b.const([-1])])
        b.op("ScatterND", [_zeros_like_type(b, dy, shape), rows, dy], node.output[0], reduction="add")
        return
    after = axis + 1 if axis != -1 else _END  # first dim after the axis (none after the last one)
    prefix = _product(b, b.op("Slice", [shape, b.const([0]), b.const([axis])]))  # Slice end -1 = rank - 1
    dim = b.op("Slice", [shape, b.const([axis]), b.const([after])])
    suffix = _product(b, b.op("Slice", [shape, b.const([after]), b.const([_END])]))
    dy3 = b.op("Reshape", [dy, b.op("Concat", [prefix, b.const([-1]), suffix], axis=0)])
    index3 = b.op("Expand", [b.op("Reshape", [indices, b.const([1, -1, 1])]), b.op("Shape", [dy3])])
    zeros = _zeros_like_type(b, dy, b.op("Concat", [prefix, dim, suffix], axis=0))
    summed = b.op("ScatterElements", [zeros, index3, dy3], axis=1, reduction="add")
    b.op("Reshape", [summed, shape], node.output[0])
