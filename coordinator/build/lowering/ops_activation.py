"""Element-wise and softmax-family gradients, and DropoutGrad, as standard ONNX.

Each rule takes the builder and the ORT training node and emits nodes that
write the node's own output names, with the semantics of ORT's CPU kernel.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from coordinator.build.lowering.builder import Builder, attr, has_input

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_GELU_PDF = 0.5 * (2.0 / math.sqrt(math.pi)) * _SQRT1_2  # 1/sqrt(2*pi)
_FAST_ALPHA = math.sqrt(2.0 / math.pi)
_FAST_GAMMA = 0.044715


def _mask(b: Builder, condition: str) -> str:
    """A bool tensor as 1.0/0.0: multiplying by it is ~5x faster in onnxruntime than Where with a scalar."""
    return b.op("Cast", [condition], to=onnx.TensorProto.FLOAT)


def relu_grad(b: Builder, node: onnx.NodeProto) -> None:
    """dX = dY where Y > 0, else 0 (as dY * [Y > 0]: equal values; a non-finite dY where Y <= 0 gives NaN)."""
    dy, y = node.input[0], node.input[1]
    b.op("Mul", [dy, _mask(b, b.op("Greater", [y, b.scalar(0.0)]))], node.output[0])


def sigmoid_grad(b: Builder, node: onnx.NodeProto) -> None:
    """dX = dY * Y * (1 - Y)."""
    dy, y = node.input[0], node.input[1]
    one_minus = b.op("Sub", [b.scalar(1.0), y])
    b.op("Mul", [b.op("Mul", [dy, y]), one_minus], node.output[0])


def tanh_grad(b: Builder, node: onnx.NodeProto) -> None:
    """dX = dY * (1 - Y^2)."""
    dy, y = node.input[0], node.input[1]
    one_minus = b.op("Sub", [b.scalar(1.0), b.op("Mul", [y, y])])
    b.op("Mul", [dy, one_minus], node.output[0])


def _gelu_derivative(b: Builder, x: str) -> str:
    """d gelu(x)/dx = Phi(x) + x * phi(x) (exact, erf-based)."""
    cdf = b.op(
        "Mul", [b.scalar(0.5), b.op("Add", [b.scalar(1.0), b.op("Erf", [b.op("Mul", [x, b.scalar(_SQRT1_2)])])])]
    )
    half_sq = b.op("Mul", [b.scalar(-0.5), b.op("Mul", [x, x])])
    pdf = b.op("Mul", [b.op("Exp", [half_sq]), b.scalar(_GELU_PDF)])
    return b.op("Add", [cdf, b.op("Mul", [x, pdf])])


def _fast_gelu_derivative(b: Builder, x: str) -> str:
    """Derivative of the tanh approximation 0.5 x (1 + tanh(a (x + g x^3)))."""
    x_sq = b.op("Mul", [x, x])
    inner = b.op(
        "Mul", [b.scalar(_FAST_ALPHA), b.op("Add", [x, b.op("Mul", [b.scalar(_FAST_GAMMA), b.op("Mul", [x_sq, x])])])]
    )
    t = b.op("Tanh", [inner])
    slope = b.op("Add", [b.scalar(_FAST_ALPHA), b.op("Mul", [b.scalar(3.0 * _FAST_GAMMA * _FAST_ALPHA), x_sq])])
    sech_sq = b.op("Sub", [b.scalar(1.0), b.op("Mul", [t, t])])
    total = b.op("Add", [b.op("Add", [b.scalar(1.0), t]), b.op("Mul", [x, b.op("Mul", [sech_sq, slope])])])
    return b.op("Mul", [b.scalar(0.5), total])


def gelu_grad(b: Builder, node: onnx.NodeProto) -> None:
    """GeluGrad(dY, X) and BiasGeluGrad_dX(dY, X, B) (the derivative taken at X + B)."""
    x = node.input[1] if not has_input(node, 2) else b.op("Add", [node.input[1], node.input[2]])
    b.op("Mul", [node.input[0], _gelu_derivative(b, x)], node.output[0])


def fast_gelu_grad(b: Builder, node: onnx.NodeProto) -> None:
    """FastGeluGrad(dY, X) and BiasFastGeluGrad_dX(dY, X, B)."""
    x = node.input[1] if not has_input(node, 2) else b.op("Add", [node.input[1], node.input[2]])
    b.op("Mul", [node.input[0], _fast_gelu_derivative(b, x)], node.output[0])


def _coerced(b: Builder, node: onnx.NodeProto, axis: int) -> tuple[str, str, int, bool]:
    """For the pre-13 ops, flatten (dY, Y) to 2-D at ``axis``; reduce over axis 1 then."""
    if node.op_type.endswith("_13"):
        return node.input[0], node.input[1], axis, False
    dy = b.op("Flatten", [node.input[0]], axis=axis)
    y = b.op("Flatten", [node.input[1]], axis=axis)
    return dy, y, 1, True


def softmax_grad(b: Builder, node: onnx.NodeProto) -> None:
    """SoftmaxGrad_13 / SoftmaxGrad: dX = Y * (dY - sum(dY * Y, axis))."""
    default = -1 if node.op_type.endswith("_13") else 1
    dy, y, axis, flat = _coerced(b, node, int(attr(node, "axis", default)))
    dot = b.reduce("ReduceSum", b.op("Mul", [dy, y]), [axis])
    out = node.output[0] if not flat else None
    dx = b.op("Mul", [y, b.op("Sub", [dy, dot])], out)
    if flat:
        b.op("Reshape", [dx, b.op("Shape", [node.input[0]])], node.output[0])


def log_softmax_grad(b: Builder, node: onnx.NodeProto) -> None:
    """LogSoftmaxGrad_13 / LogSoftmaxGrad: dX = dY - exp(Y) * sum(dY, axis)."""
    default = -1 if node.op_type.endswith("_13") else 1
    dy, y, axis, flat = _coerced(b, node, int(attr(node, "axis", default)))
    total = b.reduce("ReduceSum", dy, [axis])
    out = node.output[0] if not flat else None
    dx = b.op("Sub", [dy, b.op("Mul", [b.op("Exp", [y]), total])], out)
    if flat:
        b.op("Reshape", [dx, b.op("Shape", [node.input[0]])], node.output[0])


def dropout_grad(b: Builder, node: onnx.NodeProto) -> None:
    """DropoutGrad(dY, mask, ratio=0.5, training_mode): dX = mask * dY / (1 - ratio); dY itself when ratio is 0.

    The mask is the forward Dropout's mask output, so the backward pass drops exactly
    what the forward pass dropped. ORT's CPU kernel ignores ``training_mode``.
    """
    dy, mask = node.input[0], node.input[1]
    ratio = b.op("Cast", [node.input[2]], to=onnx.TensorProto.FLOAT) if has_input(node, 2) else b.scalar(0.5)
    ratio = b.op("Reshape", [ratio, b.const(np.zeros(0, np.int64))])  # a scalar, whatever its rank-0/1 shape
    keep = b.op("Or", [mask, b.op("Equal", [ratio, b.scalar(0.0)])])
    kept = b.op("Mul", [dy, _mask(b, keep)])
    b.op("Div", [kept, b.op("Sub", [b.scalar(1.0), ratio])], node.output[0])
