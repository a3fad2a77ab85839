"""Whole-graph lowering: an ORT training (or eval) graph -> one portable graph.

The portable training graph takes the batch and every tensor of the model as
inputs and returns (loss, logits, gradient of each trainable tensor, updated
running stats of every BatchNorm layer). Gradient accumulation buffers, the
reset flag and the optimizer stay behind: the device applies the update itself.
Every BatchNorm runs in training mode and its running stats follow the data, as
ONNX Runtime updates them in place for OrtTrainer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx
from onnx import helper

from coordinator.build.lowering.builder import MS_DOMAIN, Builder, LoweringError
from coordinator.build.lowering.rules import lower_node, unportable

logger = logging.getLogger(__name__)

MAX_IR_VERSION = 10  # onnxruntime-training 1.19.2 refuses newer IR versions
MIN_OPSET = 13  # ReduceSum/Split forms the rules emit
_ACCUMULATOR = "InPlaceAccumulatorV2"
_BUFFER_SUFFIX = "_grad.accumulation.buffer"
_BATCHNORMS = ("BatchNormInternal", "BatchNormalization")
UPDATED_SUFFIX = "_updated"  # output name of a running stat's new value: "<buffer>_updated"


@dataclass(frozen=True)
class Interface:
    """Names the portable graph is built around (from the segment manifest)."""

    input_name: str
    label_name: str
    loss_name: str
    logits_name: str
    order: tuple[str, ...]  # every model tensor, each a graph input
    trainable: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()  # running stats whose updated values the training graph returns
    extra_inputs: tuple[str, ...] = ()  # further loss inputs after the labels (knowledge distillation)


@dataclass(frozen=True)
class LoweredGraph:
    model: onnx.ModelProto
    grad_outputs: dict[str, str] = field(default_factory=dict)  # trainable tensor -> gradient output
    buffer_outputs: dict[str, str] = field(default_factory=dict)  # running stat -> its updated value output


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise LoweringError("model imports no default-domain opset")


def _gradients(graph: onnx.GraphProto, trainable: Sequence[str]) -> dict[str, str]:
    """Trainable tensor -> the gradient tensor its accumulator adds (read off the accumulator nodes)."""
    found: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == _ACCUMULATOR and node.input[0].endswith(_BUFFER_SUFFIX):
            found[node.input[0][: -len(_BUFFER_SUFFIX)]] = node.input[1]
    if set(found) != set(trainable):
        raise LoweringError(
            f"training graph accumulates gradients for {sorted(found)}, the segment trains {sorted(trainable)}"
        )
    return {name: found[name] for name in trainable}


def _running_stats(b: Builder, graph: onnx.GraphProto, buffers: Sequence[str]) -> dict[str, str]:
    """Expose each buffer's updated value (a training-mode BatchNorm output) as ``<buffer>_updated``."""
    sources: dict[str, str] = {}
    for node in graph.node:
        if node.op_type in _BATCHNORMS and len(node.input) >= 5:
            for index in (3, 4):
                name = node.input[index]
                if name in sources:
                    raise LoweringError(f"running stat {name!r} feeds more than one BatchNorm")
                if len(node.output) > index - 2 and node.output[index - 2]:
                    sources[name] = node.output[index - 2]
    missing = [name for name in buffers if name not in sources]
    if missing:
        raise LoweringError(f"buffers not updated by any training-mode BatchNorm: {missing}")
    return {name: b.identity(sources[name], name + UPDATED_SUFFIX) for name in buffers}


def _prune(nodes: list[onnx.NodeProto], outputs: Sequence[str]) -> list[onnx.NodeProto]:
    """Nodes the outputs depend on, in their original (topological) order."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(name in needed for name in node.output if name):
            kept.append(node)
            needed.update(name for name in node.input if name)
    return list(reversed(kept))


def _value_info(source: onnx.GraphProto, name: str, fallback: onnx.ValueInfoProto | None = None) -> onnx.ValueInfoProto:
    infos: list[onnx.ValueInfoProto] = [*source.input, *source.output, *source.value_info]
    for info in infos:
        if info.name == name:
            return info
    if fallback is None:
        raise LoweringError(f"graph declares no type for {name!r}")
    return fallback


def _tensor_info(name: str, shape: Sequence[int | str | None] | None) -> onnx.ValueInfoProto:
    info: onnx.ValueInfoProto = helper.make_tensor_value_info(
        name, onnx.TensorProto.FLOAT, None if shape is None else list(shape)
    )
    return info


def _assemble(
    source: onnx.ModelProto, b: Builder, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
) -> onnx.ModelProto:
    """The portable model: pruned nodes, only the constants they use, standard opset imports."""
    nodes = _prune(b.nodes, [o.name for o in outputs])
    used = {name for node in nodes for name in node.input}
    inits = [i for i in [*source.graph.initializer, *b.initializers] if i.name in used]
    graph = helper.make_graph(nodes, source.graph.name or "portable", inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", default_opset(source))]
    if any(node.domain == MS_DOMAIN for node in nodes):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="snakelearn-lowering")
    model.ir_version = min(source.ir_version, MAX_IR_VERSION)
    refused = unportable(nodes)
    if refused:
        raise LoweringError(f"lowered graph still has operators plain onnxruntime lacks: {refused}")
    onnx.checker.check_model(model)
    return model


def _builder(model: onnx.ModelProto) -> Builder:
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise LoweringError(f"opset {opset} < {MIN_OPSET}: re-export the forward model at a newer opset")
    return Builder(model.graph, opset=opset)


def _data_inputs(model: onnx.ModelProto, names: Interface) -> list[onnx.ValueInfoProto]:
    inputs = [_value_info(model.graph, names.input_name), _value_info(model.graph, names.label_name)]
    inputs += [_value_info(model.graph, name) for name in names.extra_inputs]
    for name in names.order:
        inputs.append(_value_info(model.graph, name, _tensor_info(name, None)))
    return inputs


def lower_training_model(model: onnx.ModelProto, names: Interface) -> LoweredGraph:
    """The portable training graph of an ORT ``training_model.onnx``."""
    b = _builder(model)
    grads = _gradients(model.graph, names.trainable)
    for node in model.graph.node:
        if node.op_type != _ACCUMULATOR:  # the device keeps no gradient buffers: grads are outputs
            lower_node(b, node)
    stats = _running_stats(b, model.graph, names.buffers)
    shapes = {name: b.shapes.get(name) for name in names.order}
    outputs = [_value_info(model.graph, names.loss_name), _value_info(model.graph, names.logits_name)]
    outputs += [_tensor_info(grads[name], shapes[name]) for name in names.trainable]
    outputs += [_tensor_info(stats[name], shapes[name]) for name in names.buffers]
    lowered = _assemble(model, b, _data_inputs(model, names), outputs)
    logger.debug("lowered training graph: %d -> %d nodes", len(model.graph.node), len(lowered.graph.node))
    return LoweredGraph(lowered, grads, stats)


def lower_eval_model(model: onnx.ModelProto, names: Interface) -> LoweredGraph:
    """The portable eval graph (loss, logits) of an ORT ``eval_model.onnx``."""
    b = _builder(model)
    for node in model.graph.node:
        lower_node(b, node)
    outputs = [_value_info(model.graph, names.loss_name), _value_info(model.graph, names.logits_name)]
    return LoweredGraph(_assemble(model, b, _data_inputs(model, names), outputs))
