"""Knowledge-distillation loss as an onnxblock loss block (torch-free; onnxruntime-training only).

    loss = CE(student + adjust, y) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with both terms batch means. ``adjust`` [num_classes] is the logit adjustment (Menon et al. 2021,
"Long-tail learning via logit adjustment"; the balanced softmax of Ren et al. 2020): tau * log of the
hop's local label prior, added to the logits inside the cross-entropy only, so the classifier learns
scores for a uniform label mix instead of the hop's skewed one (and barely pushes down classes the hop
does not hold). The teacher logits, alpha, T and adjust are graph inputs, so one
training graph serves every alpha, T and prior, and the eval graph (which carries the same loss)
reports plain cross-entropy when fed alpha = 0 and adjust = 0. Only standard ONNX operators are used
(SoftmaxCrossEntropyLoss, Div, Softmax, LogSoftmax, Sub, Mul, ReduceMean, Add, Constant),
so ORT builds the gradient from standard gradient rules and the portable lowering handles it.
The KL row sum is taken as ReduceMean over all elements times the class count (no axes
input, whatever the opset).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import onnx
from onnx import TensorProto, helper

from edge_agent.ort_training import training_module

logger = logging.getLogger(__name__)

LABEL_NAME = "labels"
TEACHER_NAME = "teacher_logits"  # float [N, num_classes]
ALPHA_NAME = "kd_alpha"  # float scalar
TEMPERATURE_NAME = "kd_temperature"  # float scalar
ADJUST_NAME = "logit_adjust"  # float [num_classes]: added to the logits inside the cross-entropy


def _node(model: onnx.ModelProto, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
    graph_utils = training_module("onnxblock._graph_utils")
    out = str(graph_utils.generate_graph_name(hint))
    name = str(graph_utils.generate_graph_name(f"kd.{op_type}"))
    model.graph.node.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
    return out


def _add_inputs(model: onnx.ModelProto, logits: str, num_classes: int) -> None:
    """Graph inputs for labels (int64 [N]), teacher logits (like ``logits``), alpha and T (scalars) and the
    logit adjustment ([num_classes])."""
    graph_utils = training_module("onnxblock._graph_utils")
    like = graph_utils.get_output_from_output_name(model, logits)
    if not graph_utils.node_arg_exists(model, LABEL_NAME):
        labels = copy.deepcopy(like)
        labels.name = LABEL_NAME
        labels.type.tensor_type.elem_type = TensorProto.INT64
        del labels.type.tensor_type.shape.dim[-1]
        model.graph.input.append(labels)
    teacher = copy.deepcopy(like)
    teacher.name = TEACHER_NAME
    model.graph.input.append(teacher)
    for name in (ALPHA_NAME, TEMPERATURE_NAME):
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
    model.graph.input.append(helper.make_tensor_value_info(ADJUST_NAME, TensorProto.FLOAT, [num_classes]))


def _kd_nodes(model: onnx.ModelProto, logits: str, num_classes: int) -> str:
    """alpha * T^2 * mean over rows of KL(p_teacher || p_student); returns the scalar's name."""
    student = _node(model, "Div", [logits, TEMPERATURE_NAME], "kd.student_scaled")
    teacher = _node(model, "Div", [TEACHER_NAME, TEMPERATURE_NAME], "kd.teacher_scaled")
    p_teacher = _node(model, "Softmax", [teacher], "kd.p_teacher", axis=-1)
    log_teacher = _node(model, "LogSoftmax", [teacher], "kd.log_p_teacher", axis=-1)
    log_student = _node(model, "LogSoftmax", [student], "kd.log_p_student", axis=-1)
    diff = _node(model, "Sub", [log_teacher, log_student], "kd.log_ratio")
    pointwise = _node(model, "Mul", [p_teacher, diff], "kd.pointwise")
    mean = _node(model, "ReduceMean", [pointwise], "kd.mean", keepdims=0)
    classes = helper.make_tensor("value", TensorProto.FLOAT, [], [float(num_classes)])
    count = _node(model, "Constant", [], "kd.num_classes", value=classes)
    kl = _node(model, "Mul", [mean, count], "kd.kl")
    t_squared = _node(model, "Mul", [TEMPERATURE_NAME, TEMPERATURE_NAME], "kd.t_squared")
    scale = _node(model, "Mul", [ALPHA_NAME, t_squared], "kd.scale")
    return _node(model, "Mul", [scale, kl], "kd.term")


def kd_loss_block(num_classes: int) -> object:
    """An ``onnxblock.Block`` computing CE(logits + adjust) + alpha * T^2 * KL, for ``generate_artifacts(loss=...)``."""
    onnxblock = training_module("onnxblock")
    graph_utils = training_module("onnxblock._graph_utils")

    class KnowledgeDistillationLoss(onnxblock.Block):  # type: ignore[misc, name-defined]
        def build(self, logits: str, *_others: str) -> str:  # the forward graph's outputs; logits first
            model: onnx.ModelProto = self.base
            _add_inputs(model, logits, num_classes)
            adjusted = _node(model, "Add", [logits, ADJUST_NAME], "kd.adjusted_logits")
            ce = str(graph_utils.generate_graph_name("kd.ce"))
            log_prob = str(graph_utils.generate_graph_name("kd.log_prob"))
            node = helper.make_node(
                "SoftmaxCrossEntropyLoss",
                [adjusted, LABEL_NAME],
                [ce, log_prob],
                reduction="mean",
                name=str(graph_utils.generate_graph_name("kd.SoftmaxCrossEntropyLoss")),
            )
            model.graph.node.append(node)
            return _node(model, "Add", [ce, _kd_nodes(model, logits, num_classes)], "loss")

    return KnowledgeDistillationLoss()
