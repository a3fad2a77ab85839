"""ConvGrad and MaxPoolGrad as standard ONNX (any number of spatial dims).

ConvGrad: dW is a convolution of the input with dY (strides and dilations swap
roles), dX a ConvTranspose of dY with W, zero-padded and cropped back to the
input's extent, dB a sum of dY. MaxPoolGrad scatters dY into the positions the
forward MaxPool's Indices output names (flat offsets into the input, as ORT's
kernel reads them).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from coordinator.build.lowering.builder import Builder, LoweringError, attr, wanted


def _rank(b: Builder, node: onnx.NodeProto) -> int:
    """Number of spatial dims of a ConvGrad node."""
    for key, per_axis in (("kernel_shape", 1), ("strides", 1), ("dilations", 1), ("pads", 2)):
        value = attr(node, key)
        if value:
            return len(value) // per_axis
    shape = b.shapes.get(node.input[2])
    if shape is not None and len(shape) > 2:
        return len(shape) - 2
    raise LoweringError(f"{node.op_type} {node.name!r}: cannot tell the number of spatial dims")


def _conv_params(b: Builder, node: onnx.NodeProto) -> tuple[int, list[int], list[int], list[int], list[int], int]:
    """(rank, strides, dilations, pads begin, pads end, group) of a ConvGrad node."""
    rank = _rank(b, node)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise LoweringError(f"{node.op_type} {node.name!r}: auto_pad={auto_pad} is not supported; use explicit pads")
    pads = [0] * (2 * rank) if auto_pad == "VALID" else list(attr(node, "pads", [0] * (2 * rank)))
    strides = list(attr(node, "strides", [1] * rank))
    dilations = list(attr(node, "dilations", [1] * rank))
    if len(pads) != 2 * rank or len(strides) != rank or len(dilations) != rank:
        raise LoweringError(f"{node.op_type} {node.name!r}: inconsistent pads/strides/dilations")
    return rank, strides, dilations, pads[:rank], pads[rank:], int(attr(node, "group", 1))


def _kernel_size(b: Builder, node: onnx.NodeProto) -> str:
    """The kernel's spatial size as an int64 vector (static when known)."""
    kernel = attr(node, "kernel_shape")
    if kernel:
        return b.const(list(kernel))
    return b.shape_slice(node.input[2], 2)


def _weight_grad_operands(b: Builder, node: onnx.NodeProto, group: int) -> tuple[str, str]:
    """X as [C/g, g*N, *S] and dY as [Co, N, *O]: a grouped Conv of these gives dW as [C/g, Co, *K']."""
    dy, x = node.input[0], node.input[1]
    rank = _rank(b, node)
    swap = [1, 0, *range(2, 2 + rank)]
    if group == 1:
        return b.op("Transpose", [x], perm=swap), b.op("Transpose", [dy], perm=swap)
    g = b.const([group])
    per_group_in = b.op("Div", [b.shape_slice(x, 1, 2), g])
    x4 = b.op("Reshape", [x, b.concat_ints([b.const([0, group]), per_group_in, b.const([-1])])])
    x4 = b.op("Transpose", [x4], perm=[2, 1, 0, 3])  # [C/g, g, N, P]
    xs = b.op("Reshape", [x4, b.concat_ints([per_group_in, b.const([-1]), b.shape_slice(x, 2)])])
    per_group_out = b.op("Div", [b.shape_slice(dy, 1, 2), g])
    dy4 = b.op("Reshape", [dy, b.concat_ints([b.const([0, group]), per_group_out, b.const([-1])])])
    dy4 = b.op("Transpose", [dy4], perm=[1, 2, 0, 3])  # [g, Co/g, N, P']
    dys = b.op("Reshape", [dy4, b.concat_ints([b.const([-1]), b.shape_slice(dy, 0, 1), b.shape_slice(dy, 2)])])
    return xs, dys


def _weight_grad(b: Builder, node: onnx.NodeProto, out: str) -> None:
    rank, strides, dilations, begin, end, group = _conv_params(b, node)
    xs, dys = _weight_grad_operands(b, node, group)
    full = b.op("Conv", [xs, dys], pads=begin + end, strides=dilations, dilations=strides, group=group)
    axes = b.const(list(range(2, 2 + rank)))
    cropped = b.op("Slice", [full, b.const([0] * rank), _kernel_size(b, node), axes])
    b.op("Transpose", [cropped], out, perm=[1, 0, *range(2, 2 + rank)])


def _input_grad(b: Builder, node: onnx.NodeProto, out: str) -> None:
    dy, x, w = node.input[:3]
    rank, strides, dilations, begin, end, group = _conv_params(b, node)
    full = b.op("ConvTranspose", [dy, w], strides=strides, dilations=dilations, group=group)
    spatial = b.shape_slice(x, 2)
    padded_size = b.op("Add", [spatial, b.const(np.add(begin, end))])
    pad_end = b.op("Sub", [padded_size, b.shape_slice(full, 2)])
    pads = b.concat_ints([b.const([0] * (rank + 4)), pad_end])
    padded = b.op("Pad", [full, pads])
    start = b.const(begin)
    stop = b.op("Add", [spatial, start])
    b.op("Slice", [padded, start, stop, b.const(list(range(2, 2 + rank)))], out)


def conv_grad(b: Builder, node: onnx.NodeProto) -> None:
    """ConvGrad(dY, X, W) -> (dX, dW, dB); explicit or VALID padding, any strides/dilations/groups."""
    dx, dw, db = wanted(node, 0), wanted(node, 1), wanted(node, 2)
    if dx is not None:
        _input_grad(b, node, dx)
    if dw is not None:
        _weight_grad(b, node, dw)
    if db is not None:
        rank = _rank(b, node)
        b.reduce("ReduceSum", node.input[0], [0, *range(2, 2 + rank)], keepdims=0, out=db)


def _pool_input_shape(b: Builder, node: onnx.NodeProto) -> str:
    """Shape of the pooled input: dX's declared shape (batch from dY), else the Shape of the MaxPool's input.

    The declared shape comes first: a Shape node on the pooled input keeps that whole activation
    alive until the backward pass reaches it (12 MiB for VGG-11's first block at batch 64)."""
    declared = b.shapes.get(node.output[0])
    if declared is not None and len(declared) > 1 and all(d is not None for d in declared[1:]):
        return b.concat_ints([b.shape_slice(node.input[0], 0, 1), b.const([int(d or 0) for d in declared[1:]])])
    producer = b.producers.get(node.input[1])
    if producer is not None and producer.op_type == "MaxPool":
        return b.op("Shape", [producer.input[0]])
    raise LoweringError(f"MaxPoolGrad {node.name!r}: its indices do not come from a MaxPool and dX has no static shape")


def maxpool_grad(b: Builder, node: onnx.NodeProto) -> None:
    """MaxPoolGrad(dY, Indices) -> dX: dY added at each index (flat offsets into dX)."""
    if b.opset < 16:
        raise LoweringError("MaxPoolGrad needs opset >= 16 (ScatterElements with reduction)")
    shape = _pool_input_shape(b, node)
    flat = b.const([-1])
    zeros = b.op(
        "Reshape",
        [b.op("ConstantOfShape", [shape], value=helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0])), flat],
    )
    indices = b.op("Reshape", [node.input[1], flat])
    updates = b.op("Reshape", [node.input[0], flat])
    summed = b.op("ScatterElements", [zeros, indices, updates], axis=0, reduction="add")
    b.op("Reshape", [summed, shape], node.output[0])
