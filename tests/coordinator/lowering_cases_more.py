"""More operator cases for the lowering: convolution, pooling, the loss gradient, bookkeeping operators."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from tests.coordinator.lowering_cases import BOOL, FLOAT, INT64, OpCase, _f, _node, original_model, rng, run

END = int(np.iinfo(np.int64).max)


def _conv_out(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


def conv_cases() -> list[OpCase]:
    specs: list[tuple[str, tuple[int, ...], int, int, dict[str, Any]]] = [  # label, input shape, Co, group, attrs
        ("basic", (2, 3, 6, 6), 4, 1, {"pads": [1, 1, 1, 1], "strides": [1, 1]}),
        ("stride2_remainder", (2, 3, 8, 7), 4, 1, {"pads": [0, 0, 0, 0], "strides": [2, 2]}),
        ("dilated", (2, 2, 9, 8), 3, 1, {"pads": [2, 1, 2, 1], "dilations": [2, 2]}),
        ("asym_pads", (1, 2, 5, 6), 3, 1, {"pads": [0, 1, 2, 0], "strides": [2, 1]}),
        ("groups2", (2, 4, 6, 5), 6, 2, {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
        ("depthwise", (3, 4, 7, 7), 4, 4, {"pads": [1, 1, 1, 1]}),
        ("valid", (2, 3, 6, 6), 2, 1, {"auto_pad": "VALID", "strides": [1, 2]}),
        ("conv1d", (3, 2, 11), 4, 1, {"pads": [1, 2], "strides": [2], "dilations": [2]}),
        ("conv3d", (1, 2, 4, 5, 4), 3, 1, {"pads": [1, 0, 1, 1, 0, 1]}),
    ]
    return [_conv_case(*spec) for spec in specs]


def _conv_case(label: str, shape: tuple[int, ...], out_ch: int, group: int, attrs: dict[str, Any]) -> OpCase:
    rank = len(shape) - 2
    kernel = [3] * rank
    strides = attrs.get("strides", [1] * rank)
    dilations = attrs.get("dilations", [1] * rank)
    pads = attrs.get("pads", [0] * (2 * rank))
    out = [_conv_out(shape[2 + i], kernel[i], strides[i], pads[i] + pads[i + rank], dilations[i]) for i in range(rank)]
    inputs = {
        "dY": _f(shape[0], out_ch, *out),
        "X": _f(*shape),
        "W": _f(out_ch, shape[1] // group, *kernel),
    }
    node = _node("ConvGrad", ["dY", "X", "W"], ["dX", "dW", "dB"], kernel_shape=kernel, group=group, **attrs)
    outs = (("dX", FLOAT), ("dW", FLOAT), ("dB", FLOAT))
    return OpCase(f"ConvGrad_{label}", (node,), inputs, outs, atol=1e-5)


def maxpool_cases() -> list[OpCase]:
    specs: list[tuple[str, tuple[int, ...], dict[str, Any]]] = [
        ("k2s2", (2, 3, 8, 8), {"kernel_shape": [2, 2], "strides": [2, 2]}),
        ("k3s2p1", (2, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("overlap_k3s1", (1, 2, 6, 5), {"kernel_shape": [3, 3], "strides": [1, 1]}),
        ("ceil", (1, 2, 7, 7), {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
        ("dilated", (1, 2, 8, 8), {"kernel_shape": [2, 2], "dilations": [2, 2]}),
        ("pool1d", (2, 3, 9), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    ]
    cases = []
    for label, shape, attrs in specs:
        x = _f(*shape)
        x[..., :2] = 0.25  # ties: equal values in one window
        forward = _node("MaxPool", ["X"], ["Y", "indices"], domain="", **attrs)
        probe = OpCase("probe", (forward,), {"X": x}, (("Y", FLOAT),))
        pooled = run(original_model(probe), probe)[0]
        backward = _node("MaxPoolGrad", ["dY", "indices"], ["dX"], domain="", **attrs)
        inputs = {"X": x, "dY": _f(*pooled.shape)}
        case = OpCase(f"MaxPoolGrad_{label}", (forward, backward), inputs, (("dX", FLOAT),), static={"dX": shape})
        cases.append(case)
    return cases


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))).astype(np.float32)


def loss_cases() -> list[OpCase]:
    specs: list[
        tuple[str, tuple[int, ...], str, int | None, bool]
    ] = [  # label, logits shape, reduction, ignore, weight
        ("mean", (8, 5), "mean", None, False),
        ("sum", (8, 5), "sum", None, False),
        ("none", (8, 5), "none", None, False),
        ("ignore_-100", (8, 5), "mean", -100, False),
        ("ignore_class1", (8, 5), "mean", 1, False),
        ("weighted_mean", (8, 5), "mean", None, True),
        ("weighted_ignore", (8, 5), "mean", 2, True),
        ("weighted_none", (8, 5), "none", 3, True),
        ("all_ignored", (4, 5), "mean", 0, False),
        ("spatial", (3, 4, 6), "mean", -1, False),
    ]
    return [_loss_case(*spec) for spec in specs]


def _loss_case(label: str, shape: tuple[int, ...], reduction: str, ignore: int | None, weighted: bool) -> OpCase:
    labels = rng().integers(0, shape[1], (shape[0], *shape[2:])).astype(np.int64)
    if label == "all_ignored":
        labels[...] = ignore
    elif ignore is not None:
        labels.flat[::3] = ignore  # every third label ignored
    dy = _f(*labels.shape) if reduction == "none" else np.array(_f(1)[0] + 1.5, np.float32)
    inputs = {"dY": dy, "log_prob": _log_softmax(_f(*shape, scale=2.0)), "labels": labels}
    if weighted:
        inputs["weight"] = (rng().random(shape[1]) + 0.5).astype(np.float32)
    attrs: dict[str, Any] = {"reduction": reduction}
    if ignore is not None:
        attrs["ignore_index"] = ignore
    node = _node("SoftmaxCrossEntropyLossGrad", list(inputs), ["dlogits"], **attrs)
    return OpCase(f"SoftmaxCrossEntropyLossGrad_{label}", (node,), inputs, (("dlogits", FLOAT),))


def bookkeeping_cases() -> list[OpCase]:
    cases = []
    for axis in (1, -1):
        inputs = {"a": _f(2, 3, 4), "b": _f(2, 3, 2), "c": _f(2, 3, 5)} if axis == -1 else {}
        inputs = inputs or {"a": _f(2, 3, 4), "b": _f(2, 1, 4), "c": _f(2, 5, 4)}
        node = _node("ConcatTraining", ["a", "b", "c"], ["joined", "lengths"], axis=axis)
        outs = (("joined", FLOAT), ("lengths", INT64))
        cases.append(OpCase(f"ConcatTraining_axis{axis}", (node,), inputs, outs))
    split = {"x": _f(3, 6, 2), "split": np.array([2, 3, 1], np.int64)}
    node = _node("SplitTraining", ["x", "split"], ["p0", "p1", "p2"], axis=1)
    cases.append(OpCase("SplitTraining", (node,), split, (("p0", FLOAT), ("p1", FLOAT), ("p2", FLOAT))))
    for label, flag in (("accumulate", False), ("overwrite", True), ("no_flag", None)):
        inputs = {"buffer": _f(4, 3), "value": _f(4, 3)}
        if flag is not None:
            inputs["overwrite"] = np.array([flag])
        node = _node("InPlaceAccumulatorV2", list(inputs), ["updated", "accumulated"])
        outs = (("updated", BOOL), ("accumulated", FLOAT))
        cases.append(OpCase(f"InPlaceAccumulatorV2_{label}", (node,), inputs, outs))
    for down in (0, 1):  # ReduceMean's gradient (knowledge-distillation loss)
        inputs = {"x": _f(4, 3), "s": np.array(2.5, np.float32)}
        cases.append(
            OpCase(f"Scale_down{down}", (_node("Scale", ["x", "s"], ["y"], scale_down=down),), inputs, (("y", FLOAT),))
        )
    return cases


def _ints(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def slice_cases() -> list[OpCase]:
    specs: list[tuple[str, tuple[int, ...], tuple[slice, ...], list[int] | None, list[int] | None, bool]] = [
        # label, input shape, the slice as numpy sees it, starts/ends/axes/steps, steps a graph constant
        ("qkv_last_axis", (2, 5, 12), (..., slice(4, 8)), [-1], [1], True),
        ("positions", (16, 8), (slice(0, 10),), [0], [1], True),
        ("two_axes_negative", (4, 6, 5), (slice(-3, None), slice(None), slice(1, -1)), [0, 2], None, False),
        ("no_axes_clamped", (6, 4), (slice(1, 5), slice(0, 100)), None, None, False),
        ("empty", (3, 4), (slice(None), slice(3, 1)), [1], [1], True),
        ("strided", (7, 6), (slice(0, 7, 2), slice(1, 6, 3)), [0, 1], [2, 3], False),
    ]
    bounds = {  # starts, ends of each spec (numpy's None as the ONNX end of the axis)
        "qkv_last_axis": ([4], [8]),
        "positions": ([0], [10]),
        "two_axes_negative": ([-3, 1], [END, -1]),
        "no_axes_clamped": ([1, 0], [5, 100]),
        "empty": ([3], [1]),
        "strided": ([0, 1], [7, 6]),
    }
    cases = []
    for label, shape, index, axes, steps, constant_steps in specs:
        starts, ends = bounds[label]
        out_shape = np.zeros(shape)[index].shape
        inputs = {"dY": _f(*out_shape), "shape": _ints(*shape), "starts": _ints(*starts), "ends": _ints(*ends)}
        names, nodes = ["dY", "shape", "starts", "ends"], []
        if axes is not None:
            inputs["axes"] = _ints(*axes)
            names.append("axes")
        if steps is not None and constant_steps:
            value = onnx.numpy_helper.from_array(_ints(*steps), "steps_value")
            nodes.append(_node("Constant", [], ["steps"], domain="", value=value))
            names.append("steps")
        elif steps is not None:
            inputs["steps"] = _ints(*steps)
            names.append("steps")
        nodes.append(_node("SliceGrad", names, ["dX"]))
        cases.append(OpCase(f"SliceGrad_{label}", tuple(nodes), inputs, (("dX", FLOAT),)))
    return cases


def gather_cases() -> list[OpCase]:
    specs: list[tuple[str, tuple[int, ...], np.ndarray, int]] = [  # label, input shape, indices, axis
        ("embedding", (10, 6), rng().integers(0, 10, (3, 5)), 0),  # repeated tokens: their rows sum
        ("axis1", (4, 7, 3), _ints(1, 6, 1, 0, 6), 1),
        ("last_axis", (3, 8), _ints(2, 7, 2, 5).reshape(2, 2), -1),
        ("scalar_index", (5, 4), np.array(2, np.int64), 0),
    ]
    cases = []
    for label, shape, indices, axis in specs:
        indices = np.asarray(indices, np.int64)
        out_shape = np.take(np.zeros(shape), indices, axis=axis).shape
        inputs = {"shape": _ints(*shape), "indices": indices, "dY": _f(*out_shape)}
        node = _node("GatherGrad", ["shape", "indices", "dY"], ["dX"], axis=axis)
        cases.append(OpCase(f"GatherGrad_{label}", (node,), inputs, (("dX", FLOAT),)))
    return cases
