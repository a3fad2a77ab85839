"""Lowering ONNX Runtime training graphs to standard ONNX, for devices with plain ``onnxruntime``.

Plain onnxruntime (every board, every Python) refuses ORT's training-only
operators. The coordinator, which has onnxruntime-training, generates a segment's
training graph as usual and rewrites each training-only operator with standard
ONNX operators of the same semantics (:mod:`coordinator.build.lowering.rules`). The
result computes loss, logits, gradients and BatchNorm running stats; the device
applies the optimizer update in numpy (:class:`edge_agent.portable_trainer.PortableTrainer`).

Torch-free: onnx, numpy, and onnxruntime to check that lowered graphs load.
"""

from coordinator.build.lowering.builder import Builder, LoweringError
from coordinator.build.lowering.graph import Interface, LoweredGraph, lower_eval_model, lower_training_model
from coordinator.build.lowering.rules import RULES, is_portable, lower_node, unportable
from coordinator.build.lowering.segment import EVAL_GRAPH, TRAIN_GRAPH, lower_segment

__all__ = [
    "EVAL_GRAPH",
    "RULES",
    "TRAIN_GRAPH",
    "Builder",
    "Interface",
    "LoweredGraph",
    "LoweringError",
    "is_portable",
    "lower_eval_model",
    "lower_node",
    "lower_segment",
    "lower_training_model",
    "unportable",
]
