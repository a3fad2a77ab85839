"""The loss gradient and the bookkeeping operators: ConcatTraining, SplitTraining, InPlaceAccumulatorV2, Scale."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from coordinator.build.lowering.builder import Builder, attr, has_input, wanted


def _row_factor(b: Builder, node: onnx.NodeProto, labels: str, ignored: str | None) -> str:
    """Per-label factor of SoftmaxCrossEntropyLossGrad: weight[label] * dY (scaled for mean); 0 if ignored."""
    dy = node.input[0]
    reduction = attr(node, "reduction", "mean")
    weight = b.op("Gather", [node.input[3], labels], axis=0) if has_input(node, 3) else None
    if reduction == "mean":
        if weight is not None:
            counted = weight if ignored is None else b.op("Where", [ignored, b.scalar(0.0), weight])
            total = b.op("ReduceSum", [counted], keepdims=0)  # no axes: all of them
        elif ignored is not None:
            kept = b.op("Cast", [b.op("Not", [ignored])], to=onnx.TensorProto.FLOAT)
            total = b.op("ReduceSum", [kept], keepdims=0)
        else:
            total = b.op("Cast", [b.op("Size", [labels])], to=onnx.TensorProto.FLOAT)
        nonzero = b.op("Where", [b.op("Equal", [total, b.scalar(0.0)]), b.scalar(1.0), total])  # ORT: unscaled if 0
        dy = b.op("Div", [dy, nonzero])
    factor = dy if weight is None else b.op("Mul", [weight, dy])
    if ignored is not None:
        factor = b.op("Where", [ignored, b.scalar(0.0), factor])
    return factor


def softmax_cross_entropy_loss_grad(b: Builder, node: onnx.NodeProto) -> None:
    """SoftmaxCrossEntropyLossGrad(dY, log_prob, labels[, weight]) -> dLogits = (softmax - one_hot) * factor.

    log_prob is [N, C, D1...], labels [N, D1...]; reduction "mean" (by the summed weight of
    the labels not ignored, or their count), "sum" or "none"; ``ignore_index`` rows get 0.
    """
    log_prob, labels = node.input[1], node.input[2]
    ignore_index = attr(node, "ignore_index")
    ignored: str | None = None
    if ignore_index is not None:
        ignored = b.op("Equal", [labels, b.const(int(ignore_index), np.int64)])
        labels = b.op("Where", [ignored, b.const(0, np.int64), labels])
    depth = b.shape_slice(log_prob, 1, 2)
    one_hot = b.op("OneHot", [labels, depth, b.const([0.0, 1.0], np.float32)], axis=1)
    diff = b.op("Sub", [b.op("Exp", [log_prob]), one_hot])
    factor = _row_factor(b, node, labels, ignored)
    if attr(node, "reduction", "mean") == "none" or ignored is not None or has_input(node, 3):
        factor = b.op("Unsqueeze", [factor, b.const([1])])  # one factor per label: broadcast over classes
    b.op("Mul", [diff, factor], node.output[0])


def concat_training(b: Builder, node: onnx.NodeProto) -> None:
    """ConcatTraining(inputs...) -> (Concat, per-input lengths along the axis, int64)."""
    axis = int(attr(node, "axis"))
    b.op("Concat", list(node.input), node.output[0], axis=axis)
    out = wanted(node, 1)
    if out is not None:
        end = None if axis == -1 else axis + 1
        b.op("Concat", [b.shape_slice(name, axis, end) for name in node.input], out, axis=0)


def split_training(b: Builder, node: onnx.NodeProto) -> None:
    """SplitTraining(input, split) -> outputs: a standard Split (split sizes as an input)."""
    axis = int(attr(node, "axis", 0))
    if has_input(node, 1):
        b.multi("Split", [node.input[0], node.input[1]], list(node.output), axis=axis)
    elif b.opset >= 18:
        b.multi("Split", [node.input[0]], list(node.output), axis=axis, num_outputs=len(node.output))
    else:
        b.multi("Split", [node.input[0]], list(node.output), axis=axis)


def inplace_accumulator(b: Builder, node: onnx.NodeProto) -> None:
    """InPlaceAccumulatorV2(buffer, value[, overwrite]) -> (updated=true, buffer + value or value)."""
    buffer, value = node.input[0], node.input[1]
    out = wanted(node, 1)
    if out is not None:
        total = b.op("Add", [buffer, value])
        if has_input(node, 2):
            flag = b.op("Reshape", [node.input[2], b.const(np.zeros(0, np.int64))])
            b.op("Where", [flag, value, total], out)
        else:
            b.identity(total, out)
    flag_out = wanted(node, 0)
    if flag_out is not None:
        b.op("Constant", [], flag_out, value=numpy_helper.from_array(np.array([True]), "updated"))


def scale(b: Builder, node: onnx.NodeProto) -> None:
    """com.microsoft Scale (ReduceMean's gradient): ``X * s``, or ``X / s`` with scale_down=1; s cast to X's type."""
    factor = b.op("CastLike", [node.input[1], node.input[0]]) if b.opset >= 15 else node.input[1]
    op_type = "Div" if int(attr(node, "scale_down", 0)) else "Mul"
    b.op(op_type, [node.input[0], factor], node.output[0])
