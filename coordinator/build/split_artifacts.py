"""Training artifacts for a split-learning front (torch-free; onnxruntime-training only).

The front is the input side of the model, cut after a layer group. Its forward ONNX maps the
batch to activations A. The coordinator trains the rest and answers each batch with dL/dA, so
the front trains on the surrogate loss

    loss = sum(A * dA)          (dA a graph input, constant to the graph)

whose gradient with respect to every front parameter is exactly dL/dparameter (chain rule).
Only standard operators (Mul, ReduceSum) are added, as with the KD loss. The manifest records
the activations' per-sample shape; ``label_name`` names the dA input.

Besides the usual graphs the bundle holds ``probe_model.onnx``: the front's forward in training
mode (BatchNorm on batch statistics, exactly as in the training step) with every tensor a graph
input, which plain ``onnxruntime.InferenceSession`` runs to get A before dA exists (see
:mod:`edge_agent.split_trainer` for why and what it costs).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import onnx
from onnx import helper

from coordinator.build.bundle import write_manifest
from coordinator.build.ort_artifacts import (
    ArtifactError,
    _all_buffers,
    _input_shape,
    float_initializers,
    generate_checked,
    initializer_shapes,
)
from edge_agent.ort_training import training_module
from edge_agent.protocol.manifest import PROBE_FILE, SegmentManifest

logger = logging.getLogger(__name__)

GRAD_NAME = "dloss_dactivations"  # float [N, *activation_shape]: dL/dA (ORT hides inputs named *_grad*)


def surrogate_loss_block() -> object:
    """An ``onnxblock.Block`` computing sum(A * dA) over the front's output A."""
    onnxblock = training_module("onnxblock")
    graph_utils = training_module("onnxblock._graph_utils")

    class SplitSurrogateLoss(onnxblock.Block):  # type: ignore[misc, name-defined]
        def build(self, activations: str, *_others: str) -> str:
            model: onnx.ModelProto = self.base
            grad = copy.deepcopy(graph_utils.get_output_from_output_name(model, activations))
            grad.name = GRAD_NAME
            model.graph.input.append(grad)
            product = str(graph_utils.generate_graph_name("split.product"))
            loss = str(graph_utils.generate_graph_name("loss"))
            model.graph.node.append(helper.make_node("Mul", [activations, GRAD_NAME], [product], name=f"{product}.Mul"))
            model.graph.node.append(helper.make_node("ReduceSum", [product], [loss], keepdims=0, name=f"{loss}.Sum"))
            return loss

    return SplitSurrogateLoss()


def activation_shape(model: onnx.ModelProto, output_name: str) -> tuple[int, ...]:
    for output in model.graph.output:
        if output.name == output_name:
            dims = output.type.tensor_type.shape.dim[1:]
            if any(not d.HasField("dim_value") for d in dims):
                raise ArtifactError(f"front output {output_name!r} needs a static per-sample shape")
            return tuple(int(d.dim_value) for d in dims)
    raise ArtifactError(f"front model has no output {output_name!r}")


def write_probe(model: onnx.ModelProto, output_name: str, path: Path) -> None:
    """The forward graph with its float tensors as inputs (fed the current weights) and only A as output."""
    probe = copy.deepcopy(model)
    floats = float_initializers(probe)
    names = {init.name for init in floats}
    probe.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in floats)
    kept = [init for init in probe.graph.initializer if init.name not in names]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept)
    outputs = [o for o in probe.graph.output if o.name == output_name]
    del probe.graph.output[:]
    probe.graph.output.extend(outputs)
    onnx.save(probe, path)


def generate_front(
    front_onnx: Path,
    out_dir: Path,
    *,
    optimizer: str = "adamw",
    input_name: str = "input",
    output_name: str = "activations",
) -> SegmentManifest:
    """Artifacts that train every parameter of ``front_onnx`` (input -> activations) from dL/dA."""
    model = onnx.load(front_onnx)
    order = [init.name for init in float_initializers(model)]
    buffers = _all_buffers(model)
    trainable = [name for name in order if name not in set(buffers)]
    if not trainable:
        raise ArtifactError("the front has no trainable parameter")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loss_name, activations_out = generate_checked(
        model, trainable, buffers, out, optimizer, output_name, order, loss=surrogate_loss_block()
    )
    manifest = SegmentManifest(
        input_name=input_name,
        label_name=GRAD_NAME,
        logits_name=activations_out,
        loss_name=loss_name,
        order=tuple(order),
        shapes=initializer_shapes(model),
        trainable=tuple(trainable),
        buffers=tuple(n for n in order if n in set(buffers)),
        segment_buffers=tuple(n for n in order if n in set(buffers)),
        optimizer=optimizer,
        num_classes=0,
        input_shape=_input_shape(model, input_name),
        activation_shape=activation_shape(model, output_name),
    )
    write_probe(model, output_name, out / PROBE_FILE)
    write_manifest(out, manifest)
    logger.info("generated split front artifacts: %d trainable tensors, activations %s", len(trainable),
                manifest.activation_shape)  # fmt: skip
    return manifest
