"""Operator-level cases for the lowering: small graphs around one ORT training operator, random inputs.

Each case runs twice: as is, with ORT's training kernel (onnxruntime-training), and
lowered to standard ONNX. Used by test_lowering_ops.py (both in one process) and by
portable_cases.py (the lowered graph and the kernel's outputs, for plain onnxruntime).
Needs onnx and numpy; runs need onnxruntime-training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from coordinator.build.lowering import Builder, lower_node, unportable

MS = "com.microsoft"
FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
OPSET = 17


@dataclass(frozen=True)
class OpCase:
    name: str
    nodes: tuple[onnx.NodeProto, ...]
    inputs: dict[str, np.ndarray]
    outputs: tuple[tuple[str, int], ...]  # (name, element type) of every compared output
    static: dict[str, tuple[int, ...]] = field(default_factory=dict)  # output shapes the ORT kernel needs
    seed: int | None = None  # onnxruntime.set_seed before each run (random operators)
    rtol: float = 1e-5
    atol: float = 1e-6


def _model(
    nodes: Sequence[onnx.NodeProto],
    case: OpCase,
    inits: Sequence[onnx.TensorProto] = (),
    shapes: Sequence[Sequence[int]] | None = None,
) -> onnx.ModelProto:
    inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
        for name, value in case.inputs.items()
    ]
    declared = [case.static.get(name) for name, _ in case.outputs] if shapes is None else list(shapes)
    outputs = [
        helper.make_tensor_value_info(name, kind, shape)
        for (name, kind), shape in zip(case.outputs, declared, strict=True)
    ]
    graph = helper.make_graph(list(nodes), case.name, inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def original_model(case: OpCase) -> onnx.ModelProto:
    return _model(case.nodes, case)


def lowered_model(case: OpCase, expected: Sequence[np.ndarray]) -> onnx.ModelProto:
    """The case's graph with every node lowered (standard ONNX only; outputs typed like ``expected``)."""
    source = original_model(case)
    builder = Builder(source.graph, opset=OPSET)
    for node in case.nodes:
        lower_node(builder, node)
    refused = unportable(builder.nodes)
    assert not refused, refused
    model = _model(builder.nodes, case, builder.initializers, [value.shape for value in expected])
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, case: OpCase) -> list[np.ndarray]:
    """Outputs of ``model`` on the case's inputs (onnxruntime, CPU)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    if case.seed is not None:
        onnxruntime.set_seed(case.seed)
    feeds = {name: value.copy() for name, value in case.inputs.items()}  # some kernels write their inputs
    return list(session.run([name for name, _ in case.outputs], feeds))


# -- builders ------------------------------------------------------------------------------------

SEED = 1234
_rng = np.random.default_rng(SEED)


def rng() -> np.random.Generator:
    return _rng


def _f(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (_rng.standard_normal(shape) * scale).astype(np.float32)


def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], domain: str = MS, **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), domain=domain, name=op, **attrs)


def _unary(op: str, shape: Sequence[int], y: np.ndarray | None = None, atol: float = 1e-6) -> OpCase:
    second = y if y is not None else _f(*shape)
    inputs = {"dY": _f(*shape), "Y": second}
    return OpCase(f"{op}", (_node(op, ["dY", "Y"], ["dX"]),), inputs, (("dX", FLOAT),), atol=atol)


def activation_cases() -> list[OpCase]:
    relu_y = np.maximum(_f(4, 6, 5), 0).astype(np.float32)  # exact zeros where the forward clipped
    sigmoid_y = (1 / (1 + np.exp(-_f(3, 7)))).astype(np.float32)
    tanh_y = np.tanh(_f(3, 7)).astype(np.float32)
    cases = [_unary("ReluGrad", (4, 6, 5), relu_y), _unary("SigmoidGrad", (3, 7), sigmoid_y)]
    cases += [_unary("TanhGrad", (3, 7), tanh_y)]
    # erf/tanh/exp differ by an ulp or so between kernels, and x * pdf(x) amplifies that for |x| ~ 5
    for op in ("GeluGrad", "FastGeluGrad"):
        cases.append(_unary(op, (5, 9), _f(5, 9, scale=2.0), atol=1e-5))
    for op in ("BiasGeluGrad_dX", "BiasFastGeluGrad_dX"):
        node = _node(op, ["dY", "X", "B"], ["dX"])
        inputs = {"dY": _f(4, 6), "X": _f(4, 6, scale=2.0), "B": _f(6)}
        cases.append(OpCase(op, (node,), inputs, (("dX", FLOAT),), atol=1e-5))
    for op, axis in (("SoftmaxGrad_13", -1), ("SoftmaxGrad_13", 1), ("SoftmaxGrad_13", 0), ("SoftmaxGrad", 1)):
        cases.append(_softmax_case(op, axis, log=False))
    for op, axis in (("LogSoftmaxGrad_13", -1), ("LogSoftmaxGrad_13", 1), ("LogSoftmaxGrad", 1)):
        cases.append(_softmax_case(op, axis, log=True))
    return cases


def _softmax_case(op: str, axis: int, log: bool) -> OpCase:
    logits = _f(3, 4, 5, scale=2.0).astype(np.float64)
    if op.endswith("_13"):
        shifted = logits - logits.max(axis=axis, keepdims=True)
        log_y = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    else:  # pre-13: softmax over the dims from ``axis`` on, flattened
        flat = logits.reshape(int(np.prod(logits.shape[:axis])), -1)
        flat = flat - flat.max(axis=1, keepdims=True)
        log_y = (flat - np.log(np.exp(flat).sum(axis=1, keepdims=True))).reshape(logits.shape)
    y = (log_y if log else np.exp(log_y)).astype(np.float32)
    node = _node(op, ["dY", "Y"], ["dX"], axis=axis)
    return OpCase(f"{op}_axis{axis}", (node,), {"dY": _f(3, 4, 5), "Y": y}, (("dX", FLOAT),))


def dropout_cases() -> list[OpCase]:
    cases = []
    mask = _rng.random((6, 8)) > 0.3
    for label, ratio, mode in (("r0.3", 0.3, True), ("default", None, None), ("r0", 0.0, True), ("eval", 0.3, False)):
        inputs: dict[str, np.ndarray] = {"dY": _f(6, 8), "mask": mask}
        names = ["dY", "mask"]
        if ratio is not None:
            inputs["ratio"] = np.array(ratio, np.float32)
            names.append("ratio")
        if mode is not None:
            inputs["training_mode"] = np.array(mode)
            names.append("training_mode")
        node = _node("DropoutGrad", names, ["dX"])
        cases.append(OpCase(f"DropoutGrad_{label}", (node,), inputs, (("dX", FLOAT),)))
    forward = _node("Dropout", ["X", "ratio", "on"], ["Y", "mask"], domain="")
    backward = _node("DropoutGrad", ["dY", "mask", "ratio", "on"], ["dX"])
    inputs = {"X": _f(5, 16), "dY": _f(5, 16), "ratio": np.array(0.4, np.float32), "on": np.array(True)}
    outputs = (("Y", FLOAT), ("mask", BOOL), ("dX", FLOAT))
    cases.append(OpCase("Dropout_then_DropoutGrad", (forward, backward), inputs, outputs, seed=17))
    return cases


def batchnorm_cases() -> list[OpCase]:
    cases = []
    outs = ("Y", "running_mean", "running_var", "saved_mean", "saved_inv_std")
    for label, shape, momentum, mode in (
        ("nchw", (4, 3, 5, 6), 0.9, 1),
        ("nc", (8, 5), 0.7, 1),
        ("ncl", (3, 4, 7), 0.9, 1),
        ("inference", (4, 3, 5, 6), 0.9, 0),
    ):
        channels = shape[1]
        inputs = {
            "X": _f(*shape, scale=2.0) + 0.5,
            "scale": _f(channels) + 1.0,
            "B": _f(channels),
            "mean": _f(channels, scale=0.1),
            "var": (_rng.random(channels) + 0.5).astype(np.float32),
        }
        attrs = {"epsilon": 1e-5, "momentum": momentum, "training_mode": mode}
        node = _node("BatchNormInternal", list(inputs), list(outs if mode == 1 else outs[:1]), **attrs)
        compared = outs if mode == 1 else outs[:1]  # ORT allows one output in inference mode
        cases.append(OpCase(f"BatchNormInternal_{label}", (node,), inputs, tuple((o, FLOAT) for o in compared)))
    for label, shape in (("nchw", (4, 3, 5, 6)), ("nc", (8, 5))):
        channels = shape[1]
        x = _f(*shape, scale=2.0)
        axes = tuple(i for i in range(len(shape)) if i != 1)
        mean = x.mean(axis=axes)
        inv_std = 1 / np.sqrt(x.var(axis=axes) + 1e-5)
        inputs = {"dY": _f(*shape), "X": x, "scale": _f(channels) + 1.0, "mean": mean, "inv_std": inv_std}
        inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
        node = _node("BatchNormalizationGrad", list(inputs), ["dX", "dscale", "dbias"], epsilon=1e-5)
        outs3 = (("dX", FLOAT), ("dscale", FLOAT), ("dbias", FLOAT))
        cases.append(OpCase(f"BatchNormalizationGrad_{label}", (node,), inputs, outs3, atol=1e-5))
    return cases


def layernorm_cases() -> list[OpCase]:
    cases = []
    for label, shape, axis in (("last", (3, 4, 8), -1), ("last2", (3, 4, 6), 1), ("2d", (5, 10), -1)):
        normed = shape[axis:] if axis >= 0 else shape[axis:]
        inputs = {"X": _f(*shape, scale=2.0), "scale": _f(*normed) + 1.0, "B": _f(*normed), "dY": _f(*shape)}
        forward = _node("LayerNormalization", ["X", "scale", "B"], ["Y", "mean", "inv_std"], domain="", axis=axis)
        backward = _node(
            "LayerNormalizationGrad", ["dY", "X", "scale", "mean", "inv_std"], ["dX", "dscale", "dbias"], axis=axis
        )
        outs = (("Y", FLOAT), ("dX", FLOAT), ("dscale", FLOAT), ("dbias", FLOAT))
        cases.append(OpCase(f"LayerNormalizationGrad_{label}", (forward, backward), inputs, outs, atol=1e-5))
    return cases


def all_cases() -> list[OpCase]:
    """Every operator case, in a fixed order (inputs drawn from one seeded generator)."""
    from tests.coordinator import lowering_cases_more as more

    global _rng
    _rng = np.random.default_rng(SEED)  # the same inputs on every call
    factories = (activation_cases, dropout_cases, batchnorm_cases, layernorm_cases)
    factories += (more.conv_cases, more.maxpool_cases, more.loss_cases, more.bookkeeping_cases)
    factories += (more.slice_cases, more.gather_cases)
    return [case for factory in factories for case in factory()]
