"""Normalisation layers: training-mode BatchNorm and the BatchNorm/LayerNorm gradients.

BatchNorm rules work on the input reshaped to [N, C, -1], so they hold for any
rank (BatchNorm1d on [N, C] as well as 2-D/3-D feature maps); LayerNorm rules
on the input flattened to [M, K] at the normalised axis.
"""

from __future__ import annotations

import onnx

from coordinator.build.lowering.builder import Builder, attr, wanted

_NCL = [0, 0, -1]  # Reshape target: keep N and C, fold the spatial dims
_CHANNEL_AXES = [0, 2]  # reduce over batch and spatial dims of [N, C, L]


def _channels(b: Builder, vector: str) -> str:
    """A per-channel vector [C] as [1, C, 1]."""
    return b.op("Reshape", [vector, b.const([1, -1, 1])])


def _flat(b: Builder, tensor: str, out: str | None = None) -> str:
    return b.op("Reshape", [tensor, b.const([-1])], out)


def batchnorm_internal(b: Builder, node: onnx.NodeProto) -> None:
    """BatchNormInternal(X, scale, B, mean, var) -> (Y, running_mean, running_var, saved_mean, saved_inv_std).

    Training mode normalises with the batch mean and biased variance; the running stats
    become ``momentum * running + (1 - momentum) * batch`` (ONNX momentum convention).
    """
    x, scale, bias, mean, var = node.input[:5]
    eps, momentum = float(attr(node, "epsilon", 1e-5)), float(attr(node, "momentum", 0.9))
    if int(attr(node, "training_mode", 1)) == 0:
        _batchnorm_inference(b, node, eps)
        return
    x3 = b.op("Reshape", [x, b.const(_NCL)])
    batch_mean = b.reduce("ReduceMean", x3, _CHANNEL_AXES)
    centered = b.op("Sub", [x3, batch_mean])
    batch_var = b.reduce("ReduceMean", b.op("Mul", [centered, centered]), _CHANNEL_AXES)
    inv_std = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [batch_var, b.scalar(eps)])])])
    normed = b.op("Mul", [centered, inv_std])
    y3 = b.op("Add", [b.op("Mul", [normed, _channels(b, scale)]), _channels(b, bias)])
    b.op("Reshape", [y3, b.op("Shape", [x])], node.output[0])
    keep, take = b.scalar(momentum), b.scalar(1.0 - momentum)
    for index, running, batch in ((1, mean, batch_mean), (2, var, batch_var)):
        out = wanted(node, index)
        if out is not None:
            b.op("Add", [b.op("Mul", [running, keep]), b.op("Mul", [_flat(b, batch), take])], out)
    for index, stat in ((3, batch_mean), (4, inv_std)):
        out = wanted(node, index)
        if out is not None:
            _flat(b, stat, out)


def _batchnorm_inference(b: Builder, node: onnx.NodeProto, eps: float) -> None:
    """training_mode=0: normalise with the running stats, which pass through unchanged."""
    x, scale, bias, mean, var = node.input[:5]
    b.op("BatchNormalization", [x, scale, bias, mean, var], node.output[0], epsilon=eps)
    for index, source in ((1, mean), (2, var), (3, mean)):
        out = wanted(node, index)
        if out is not None:
            b.identity(source, out)
    out = wanted(node, 4)
    if out is not None:
        b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.scalar(eps)])])], out)


def batchnorm_grad(b: Builder, node: onnx.NodeProto) -> None:
    """BatchNormalizationGrad(dY, X, scale, saved_mean, saved_inv_std) -> (dX, dScale, dBias), training mode."""
    dy, x, scale, mean, inv_std = node.input[:5]
    dy3 = b.op("Reshape", [dy, b.const(_NCL)])
    x3 = b.op("Reshape", [x, b.const(_NCL)])
    inv3 = _channels(b, inv_std)
    xhat = b.op("Mul", [b.op("Sub", [x3, _channels(b, mean)]), inv3])
    dbias3 = b.reduce("ReduceSum", dy3, _CHANNEL_AXES)
    dscale3 = b.reduce("ReduceSum", b.op("Mul", [dy3, xhat]), _CHANNEL_AXES)
    count = b.op("Div", [_float(b, b.op("Size", [dy])), _float(b, b.op("Size", [scale]))])
    correction = b.op("Add", [dbias3, b.op("Mul", [xhat, dscale3])])
    inner = b.op("Sub", [dy3, b.op("Div", [correction, count])])
    dx3 = b.op("Mul", [inner, b.op("Mul", [_channels(b, scale), inv3])])
    if wanted(node, 0):
        b.op("Reshape", [dx3, b.op("Shape", [x])], node.output[0])
    for index, total in ((1, dscale3), (2, dbias3)):
        out = wanted(node, index)
        if out is not None:
            _flat(b, total, out)


def _float(b: Builder, tensor: str) -> str:
    return b.op("Cast", [tensor], to=onnx.TensorProto.FLOAT)


def layernorm_grad(b: Builder, node: onnx.NodeProto) -> None:
    """LayerNormalizationGrad(dY, X, scale, mean, inv_std_dev) -> (dX, dScale, dBias) over axes [axis:]."""
    dy, x, scale, mean, inv_std = node.input[:5]
    axis = int(attr(node, "axis", -1))
    dy2 = b.op("Flatten", [dy], axis=axis)
    x2 = b.op("Flatten", [x], axis=axis)
    rows = b.const([-1, 1])
    xhat = b.op("Mul", [b.op("Sub", [x2, b.op("Reshape", [mean, rows])]), b.op("Reshape", [inv_std, rows])])
    scale_shape = b.op("Shape", [scale])
    for index, value in ((1, b.op("Mul", [dy2, xhat])), (2, dy2)):
        out = wanted(node, index)
        if out is not None:
            total = b.reduce("ReduceSum", value, [0], keepdims=0)
            b.op("Reshape", [total, scale_shape], out)
    if not wanted(node, 0):
        return
    g = b.op("Mul", [dy2, b.op("Reshape", [scale, b.const([1, -1])])])
    mean_g = b.reduce("ReduceMean", g, [1])
    mean_gx = b.reduce("ReduceMean", b.op("Mul", [g, xhat]), [1])
    inner = b.op("Sub", [b.op("Sub", [g, mean_g]), b.op("Mul", [xhat, mean_gx])])
    dx2 = b.op("Mul", [inner, b.op("Reshape", [inv_std, rows])])
    b.op("Reshape", [dx2, b.op("Shape", [x])], node.output[0])
