"""Lower one segment's ORT artifact directory into a portable bundle directory.

    train.onnx      loss, logits, gradients and updated running stats (standard ONNX)
    eval.onnx       loss, logits, BatchNorm in inference mode (standard ONNX)
    manifest.json   the ORT manifest plus kind "portable", the graph files and output names

Torch-free: needs onnx, and onnxruntime (any build) to check that the graphs load.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import onnx

from coordinator.build.bundle import write_manifest
from coordinator.build.lowering.builder import LoweringError
from coordinator.build.lowering.graph import MAX_IR_VERSION, Interface, lower_eval_model, lower_training_model
from edge_agent.protocol.manifest import ManifestError, SegmentManifest, read_manifest

logger = logging.getLogger(__name__)

TRAIN_GRAPH = "train.onnx"
EVAL_GRAPH = "eval.onnx"


def interface(manifest: SegmentManifest) -> Interface:
    return Interface(
        input_name=manifest.input_name,
        label_name=manifest.label_name,
        loss_name=manifest.loss_name,
        logits_name=manifest.logits_name,
        order=manifest.order,
        trainable=manifest.trainable,
        buffers=manifest.buffers,
        extra_inputs=manifest.kd_inputs,
    )


def check_loadable(path: Path) -> None:
    """Open the graph in an onnxruntime InferenceSession (CPU); LoweringError if it does not load."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's pybind errors share no useful base class
        raise LoweringError(f"{path.name} does not load in onnxruntime: {exc}") from exc


def _save(model: onnx.ModelProto, path: Path) -> None:
    if model.ir_version > MAX_IR_VERSION:
        raise LoweringError(f"{path.name} has IR version {model.ir_version} > {MAX_IR_VERSION}")
    onnx.save(model, path)
    check_loadable(path)


def lower_segment(ort_dir: Path, out_dir: Path) -> SegmentManifest:
    """Write the portable bundle of the ORT segment in ``ort_dir`` into ``out_dir`` (created if missing)."""
    source, out = Path(ort_dir), Path(out_dir)
    try:
        manifest = read_manifest(source)
    except ManifestError as exc:
        raise LoweringError(str(exc)) from exc
    if manifest.kind != "ort":
        raise LoweringError(f"{source} holds {manifest.kind} artifacts, not ORT training artifacts")
    names = interface(manifest)
    training = lower_training_model(onnx.load(source / "training_model.onnx"), names)
    evaluation = lower_eval_model(onnx.load(source / "eval_model.onnx"), names)
    out.mkdir(parents=True, exist_ok=True)
    _save(training.model, out / TRAIN_GRAPH)
    _save(evaluation.model, out / EVAL_GRAPH)
    portable = replace(
        manifest,
        kind="portable",
        train_graph=TRAIN_GRAPH,
        eval_graph=EVAL_GRAPH,
        grad_outputs=training.grad_outputs,
        buffer_outputs=training.buffer_outputs,
    )
    write_manifest(out, portable)
    logger.info(
        "lowered segment: %d trainable, %d running stats, %d training nodes",
        len(manifest.trainable),
        len(manifest.buffers),
        len(training.model.graph.node),
    )
    return portable
