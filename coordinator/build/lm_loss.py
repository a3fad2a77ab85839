"""Next-token cross-entropy for causal language models as an onnxblock loss block (torch-free).

onnxblock's built-in CrossEntropyLoss wants the classes on axis 1, but a language model's logits
are [N, T, V]. This block transposes them to [N, V, T] and applies SoftmaxCrossEntropyLoss against
labels int64 [N, T] (the input shifted by one token) with ``ignore_index`` for padding, mean over
the counted tokens. Standard ONNX operators only (Transpose, SoftmaxCrossEntropyLoss), so ORT
builds the gradient from its standard rules.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from edge_agent.ort_training import training_module
from edge_agent.protocol.manifest import IGNORE_INDEX  # torch's default for F.cross_entropy

LABEL_NAME = "labels"  # int64 [N, T]: next-token targets, IGNORE_INDEX where there is no target


def _add_labels(model: onnx.ModelProto, logits: str) -> None:
    """Graph input ``labels`` int64 shaped like ``logits`` without its vocabulary axis."""
    graph_utils = training_module("onnxblock._graph_utils")
    if graph_utils.node_arg_exists(model, LABEL_NAME):
        return
    like = graph_utils.get_output_from_output_name(model, logits)
    dims = like.type.tensor_type.shape.dim
    shape = [d.dim_param or d.dim_value for d in dims[:-1]]
    shape[0] = "batch"
    model.graph.input.append(helper.make_tensor_value_info(LABEL_NAME, TensorProto.INT64, shape))


def lm_loss_block(ignore_index: int = IGNORE_INDEX) -> object:
    """An ``onnxblock.Block``: mean next-token cross-entropy of logits [N, T, V] against labels [N, T]."""
    onnxblock = training_module("onnxblock")
    graph_utils = training_module("onnxblock._graph_utils")

    class CausalLMLoss(onnxblock.Block):  # type: ignore[misc, name-defined]
        def build(self, logits: str, *_others: str) -> str:  # the forward graph's outputs; logits first
            model: onnx.ModelProto = self.base
            _add_labels(model, logits)
            transposed = str(graph_utils.generate_graph_name("lm.logits_nvt"))
            model.graph.node.append(
                helper.make_node(
                    "Transpose",
                    [logits],
                    [transposed],
                    perm=[0, 2, 1],
                    name=str(graph_utils.generate_graph_name("lm.Transpose")),
                )
            )
            loss = str(graph_utils.generate_graph_name("loss"))
            log_prob = str(graph_utils.generate_graph_name("lm.log_prob"))
            model.graph.node.append(
                helper.make_node(
                    "SoftmaxCrossEntropyLoss",
                    [transposed, LABEL_NAME],
                    [loss, log_prob],
                    reduction="mean",
                    ignore_index=ignore_index,
                    name=str(graph_utils.generate_graph_name("lm.SoftmaxCrossEntropyLoss")),
                )
            )
            return loss

    return CausalLMLoss()
