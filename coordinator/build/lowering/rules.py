"""Which operators get lowered, by which rule, and what plain onnxruntime runs as is."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import onnx

from coordinator.build.lowering import ops_activation, ops_conv, ops_index, ops_misc, ops_norm
from coordinator.build.lowering.builder import MS_DOMAIN, Builder, LoweringError, attr

Rule = Callable[[Builder, onnx.NodeProto], None]

RULES: dict[str, Rule] = {
    "ReluGrad": ops_activation.relu_grad,
    "SigmoidGrad": ops_activation.sigmoid_grad,
    "TanhGrad": ops_activation.tanh_grad,
    "GeluGrad": ops_activation.gelu_grad,
    "BiasGeluGrad_dX": ops_activation.gelu_grad,
    "FastGeluGrad": ops_activation.fast_gelu_grad,
    "BiasFastGeluGrad_dX": ops_activation.fast_gelu_grad,
    "SoftmaxGrad": ops_activation.softmax_grad,
    "SoftmaxGrad_13": ops_activation.softmax_grad,
    "LogSoftmaxGrad": ops_activation.log_softmax_grad,
    "LogSoftmaxGrad_13": ops_activation.log_softmax_grad,
    "DropoutGrad": ops_activation.dropout_grad,
    "BatchNormInternal": ops_norm.batchnorm_internal,
    "BatchNormalizationGrad": ops_norm.batchnorm_grad,
    "LayerNormalizationGrad": ops_norm.layernorm_grad,
    "ConvGrad": ops_conv.conv_grad,
    "MaxPoolGrad": ops_conv.maxpool_grad,
    "SliceGrad": ops_index.slice_grad,
    "GatherGrad": ops_index.gather_grad,
    "SoftmaxCrossEntropyLossGrad": ops_misc.softmax_cross_entropy_loss_grad,
    "ConcatTraining": ops_misc.concat_training,
    "SplitTraining": ops_misc.split_training,
    "InPlaceAccumulatorV2": ops_misc.inplace_accumulator,
    "Scale": ops_misc.scale,
}
"""Training-only operators (com.microsoft, and MaxPoolGrad in the default domain) and their lowering."""

PORTABLE_CONTRIB_OPS = frozenset(
    {"FusedMatMul", "TransposeMatMul", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "FusedGemm", "FusedConv"}
)
"""com.microsoft operators plain onnxruntime (1.17+) runs on CPU that ORT's training graphs may contain."""

PORTABLE_DOMAINS = ("", MS_DOMAIN)


def is_portable(node: onnx.NodeProto) -> bool:
    """Whether plain onnxruntime runs this node: a standard ONNX op (BatchNorm in inference mode) or a known contrib op."""
    if node.domain in ("", "ai.onnx"):
        if node.op_type == "BatchNormalization":
            return int(attr(node, "training_mode", 0)) == 0
        return bool(onnx.defs.has(node.op_type))
    return node.domain == MS_DOMAIN and node.op_type in PORTABLE_CONTRIB_OPS


def _training_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and int(attr(node, "training_mode", 0)) == 1


def lower_node(b: Builder, node: onnx.NodeProto) -> None:
    """Emit the node itself if plain onnxruntime runs it, else its lowering; LoweringError if it has none."""
    if _training_batchnorm(node):  # same first three outputs as BatchNormInternal
        ops_norm.batchnorm_internal(b, node)
    elif node.domain in ("", "ai.onnx", MS_DOMAIN) and node.op_type in RULES:
        RULES[node.op_type](b, node)
    elif is_portable(node):
        b.nodes.append(copy.deepcopy(node))
    else:
        domain = node.domain or "ai.onnx"
        raise LoweringError(f"no lowering for {domain}:{node.op_type} (node {node.name!r})")


def lower_nodes(b: Builder, nodes: Iterable[onnx.NodeProto]) -> None:
    for node in nodes:
        lower_node(b, node)


def unportable(nodes: Iterable[onnx.NodeProto]) -> list[str]:
    """``domain:op_type`` of every node plain onnxruntime would refuse (sorted, unique)."""
    return sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in nodes if not is_portable(n)})
