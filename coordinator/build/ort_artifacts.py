"""Build one segment's ONNX Runtime training artifacts from a forward ONNX, without torch.

Needs onnx and onnxruntime-training (not torch). The trainable set is baked
into ``training_model.onnx``, so every segment gets its own artifact directory:

    training_model.onnx   forward + CrossEntropy loss + gradients; outputs (loss, logits, ...)
                          (kd=True: CE + distillation loss, inputs teacher logits/alpha/T/logit adjustment; see kd_loss)
    eval_model.onnx       forward + loss; outputs (loss, logits)
    optimizer_model.onnx  AdamW (torch defaults) or plain SGD
    nominal_checkpoint    parameter names and shapes only: weights travel separately
    manifest.json         see :mod:`edge_agent.protocol.manifest`

The graph fixes and pitfalls this module handles are in ORT-NOTES.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx

from coordinator.build.bundle import write_manifest
from coordinator.build.generator_env import generator_env
from coordinator.build.kd_loss import ADJUST_NAME, ALPHA_NAME, TEACHER_NAME, TEMPERATURE_NAME, kd_loss_block
from coordinator.build.lm_loss import lm_loss_block
from coordinator.errors import CoordinatorError
from coordinator.onnx_external import uses_external_data
from edge_agent.optim import ADAMW_BETAS, ADAMW_EPS, ADAMW_WEIGHT_DECAY
from edge_agent.ort_training import training_module
from edge_agent.protocol.manifest import OPTIMIZERS, SegmentManifest

logger = logging.getLogger(__name__)

MAX_IR_VERSION = 10  # onnxruntime 1.19.2 refuses newer IR versions
LABEL_NAME = "labels"  # the label input onnxblock's CrossEntropyLoss adds
# AdamW as torch does it (ORT's own defaults: eps 1e-6, weight decay 0); the update rule is set by use_torch_adamw.
GRAPH_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")
_FLOAT = onnx.TensorProto.FLOAT
_GENERATE_LOCK = threading.Lock()  # generate_artifacts uses a process-global name counter


class ArtifactError(CoordinatorError):
    """Training artifacts cannot be generated from the given forward model and segment."""


def float_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The model's float32 initializers (parameters and float buffers), in graph order."""
    return [init for init in model.graph.initializer if init.data_type == _FLOAT]


def batchnorm_buffers(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """Running mean/var initializer names of each BatchNormalization, keyed by its scale name."""
    names = {init.name for init in model.graph.initializer}
    found: dict[str, tuple[str, str]] = {}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and len(node.input) == 5:
            _, scale, bias, mean, var = node.input
            if mean in names and var in names:
                found[scale] = (mean, var)
                found[bias] = (mean, var)
    return found


class _DropOrtInfo(logging.Filter):
    """Drop the INFO records onnxruntime.training logs on the root logger (``logging.info``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}onnxruntime{os.sep}" not in record.pathname


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence native INFO chatter on file descriptor 2; replay anything else through logging."""
    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None  # stop logging.info() calling basicConfig
    if guard is not None:
        root.addHandler(guard)
    drop = _DropOrtInfo()
    root.addFilter(drop)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            root.removeFilter(drop)
            if guard is not None:
                root.removeHandler(guard)
            capture.seek(0)
            _replay(capture.read().decode("utf-8", "replace"), failed)


def _replay(text: str, failed: bool) -> None:
    for line in text.splitlines():
        chatter = "[I:" in line or "[V:" in line
        if not line.strip() or (chatter and not failed):
            continue
        logger.log(logging.ERROR if failed or "[E:" in line else logging.WARNING, "onnxruntime: %s", line)


def _all_buffers(model: onnx.ModelProto) -> list[str]:
    buffers: list[str] = []
    for pair in batchnorm_buffers(model).values():
        buffers.extend(b for b in pair if b not in buffers)
    return buffers


def _default_segment_buffers(model: onnx.ModelProto, trainable: Sequence[str]) -> list[str]:
    """BN running stats whose BatchNormalization has a trainable scale or bias."""
    buffers: list[str] = []
    for name, pair in batchnorm_buffers(model).items():
        if name in trainable:
            buffers.extend(b for b in pair if b not in buffers)
    return buffers


def _optimizer_block(optimizer: str) -> object:
    onnxblock = training_module("onnxblock")
    if optimizer == "adamw":
        return onnxblock.optim.AdamW(betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=ADAMW_WEIGHT_DECAY)
    return onnxblock.optim.SGD()


def _run_generator(
    model: onnx.ModelProto,
    trainable: list[str],
    frozen: list[str],
    out: Path,
    optimizer: str,
    logits_name: str,
    kd_classes: int | None = None,
    loss: object | None = None,
    base_dir: Path | None = None,
) -> None:
    """``base_dir``: where the forward model's external data lives (:mod:`coordinator.build.generator_env`);
    ``kd_classes``: build the knowledge-distillation loss (:mod:`coordinator.build.kd_loss`) for that many classes;
    ``loss``: an onnxblock loss block that replaces cross-entropy (e.g. the split-learning surrogate)."""
    artifacts = training_module("artifacts")
    graph_utils = training_module("onnxblock._graph_utils")
    try:
        with _GENERATE_LOCK, quiet_stderr(), generator_env(model, base_dir):
            # restart the generated-name counter: same inputs, same bytes (a stable bundle digest)
            graph_utils._GRAPH_TOKEN = 0  # type: ignore[attr-defined]
            artifacts.generate_artifacts(
                model,
                requires_grad=trainable,
                frozen_params=frozen,
                loss=loss or (artifacts.LossType.CrossEntropyLoss if kd_classes is None else kd_loss_block(kd_classes)),
                optimizer=_optimizer_block(optimizer),
                artifact_directory=out,
                nominal_checkpoint=True,
                additional_output_names=[logits_name],
            )
    except Exception as exc:  # the generator raises whatever its graph tools raise
        raise ArtifactError(f"generate_artifacts failed: {exc}") from exc
    (out / "checkpoint").unlink()  # the full checkpoint holds every weight; weights travel separately


def fix_eval_batchnorm(path: Path) -> int:
    """Drop the training-only outputs of eval-mode BatchNormalization nodes (they fail to load)."""
    model = onnx.load(path)
    fixed = 0
    for node in model.graph.node:
        mode = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
        if node.op_type == "BatchNormalization" and mode == 0 and len(node.output) > 1:
            del node.output[1:]
            fixed += 1
    if fixed:
        onnx.save(model, path)
    return fixed


def use_torch_adamw(path: Path) -> int:
    """Switch AdamWOptimizer nodes to adam_mode 0, torch.optim.AdamW's update rule.

    onnxblock always writes adam_mode 1 (Hugging Face: bias correction folded into the step
    size, so eps acts ~30x larger early on, and weight decay after the update).
    """
    model = onnx.load(path)
    switched = 0
    for node in model.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attribute in node.attribute:
                if attribute.name == "adam_mode" and attribute.i != 0:
                    attribute.i = 0
                    switched += 1
    if switched:
        onnx.save(model, path)
    return switched


def generate_checked(
    model: onnx.ModelProto,
    trainable: list[str],
    frozen: list[str],
    out: Path,
    optimizer: str,
    output_name: str,
    order: Sequence[str],
    kd_classes: int | None = None,
    loss: object | None = None,
    base_dir: Path | None = None,
) -> tuple[str, str]:
    """Generate the training artifacts (``_run_generator``), give the eval graph inference-mode
    BatchNorm, configure AdamW as torch does and check the graphs: (loss name, output name)."""
    _run_generator(model, trainable, frozen, out, optimizer, output_name, kd_classes, loss, base_dir)
    fix_eval_batchnorm(out / "eval_model.onnx")
    if optimizer == "adamw" and not use_torch_adamw(out / "optimizer_model.onnx"):
        raise ArtifactError("optimizer_model.onnx has no AdamWOptimizer node to configure")
    return _check_graphs(out, order)


def initializer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {init.name: tuple(int(d) for d in init.dims) for init in float_initializers(model)}


def _check_graphs(out: Path, order: Sequence[str]) -> tuple[str, str]:
    """Check IR versions and tensor order of the generated graphs; return (loss, logits) output names."""
    for name in GRAPH_FILES:
        graph = onnx.load(out / name, load_external_data=False)
        if uses_external_data(graph):
            raise ArtifactError(f"{name} refers to external data: a bundle must be self-contained")
        version = graph.ir_version
        if version > MAX_IR_VERSION:
            raise ArtifactError(f"{name} has IR version {version} > {MAX_IR_VERSION}; pin onnx<1.18")
    training = onnx.load(out / "training_model.onnx", load_external_data=False)
    known = set(order)
    inputs = [i.name for i in training.graph.input if i.name in known]  # skips data, grad buffers, flags
    if inputs != list(order):
        raise ArtifactError("training graph tensor order differs from the forward model's initializer order")
    outputs = [o.name for o in training.graph.output]
    return outputs[0], outputs[1]


def _input_shape(model: onnx.ModelProto, input_name: str) -> tuple[int, ...]:
    for graph_input in model.graph.input:
        if graph_input.name == input_name:
            dims = graph_input.type.tensor_type.shape.dim[1:]
            if any(not d.HasField("dim_value") for d in dims):
                raise ArtifactError(f"input {input_name!r} needs a static per-sample shape")
            return tuple(d.dim_value for d in dims)
    raise ArtifactError(f"forward model has no input {input_name!r}")


def _num_classes(model: onnx.ModelProto, logits_name: str) -> int:
    for output in model.graph.output:
        if output.name == logits_name:
            dims = output.type.tensor_type.shape.dim
            if len(dims) >= 2 and dims[-1].HasField("dim_value"):
                return int(dims[-1].dim_value)
            raise ArtifactError(f"output {logits_name!r} has no static class dimension; pass num_classes")
    raise ArtifactError(f"forward model has no output {logits_name!r}")


def _segment_names(
    model: onnx.ModelProto,
    order: list[str],
    trainable: Sequence[str],
    buffers: Sequence[str] | None,
    segment_buffers: Sequence[str] | None,
    optimizer: str,
) -> tuple[list[str], list[str], list[str]]:
    """Validated (trainable, all buffers, segment buffers), each in forward order."""
    if optimizer not in OPTIMIZERS:
        raise ArtifactError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if not trainable:
        raise ArtifactError("a segment needs at least one trainable parameter")
    chosen = [name for name in order if name in set(trainable)]  # canonical: forward order
    all_buffers = _all_buffers(model) if buffers is None else list(buffers)
    owned = _default_segment_buffers(model, chosen) if segment_buffers is None else list(segment_buffers)
    unknown = sorted(set(trainable).union(all_buffers, owned) - set(order))
    if unknown:
        raise ArtifactError(f"not float initializers of the forward model: {unknown}")
    if set(trainable) & set(all_buffers):
        raise ArtifactError(f"buffers cannot be trainable: {sorted(set(trainable) & set(all_buffers))}")
    if not set(owned) <= set(all_buffers):
        raise ArtifactError(f"segment buffers that are not buffers: {sorted(set(owned) - set(all_buffers))}")
    return chosen, [n for n in order if n in set(all_buffers)], [n for n in order if n in set(owned)]


def generate_segment(
    forward_onnx: Path,
    trainable: Sequence[str],
    out_dir: Path,
    *,
    optimizer: str = "adamw",
    buffers: Sequence[str] | None = None,
    segment_buffers: Sequence[str] | None = None,
    num_classes: int | None = None,
    input_name: str = "input",
    logits_name: str = "logits",
    kd: bool = False,
    task: str = "classify",
) -> SegmentManifest:
    """Generate the artifacts of the segment that trains ``trainable`` into the empty/new ``out_dir``.

    Every other float initializer is frozen (a named, loadable tensor, never a constant).
    ``buffers`` (every float tensor that is state, not a parameter) defaults to the running
    stats of every BatchNormalization; ``segment_buffers`` (the buffers this segment owns)
    to those of each BatchNormalization whose scale or bias is trainable.
    ``kd``: the loss is CE + knowledge distillation, with the extra graph inputs teacher
    logits, alpha and temperature (:mod:`coordinator.build.kd_loss`); the manifest names them.
    ``task``: "causal-lm" builds the next-token loss of :mod:`coordinator.build.lm_loss` (logits [N, T, V],
    labels int64 [N, T], ignore_index -100) instead of the classifier's cross-entropy.
    """
    if task == "causal-lm" and kd:
        raise ArtifactError("knowledge distillation is not built for language models yet")
    forward_onnx = Path(forward_onnx).absolute()
    model = onnx.load(forward_onnx, load_external_data=False)  # the graphs need shapes, never the weights
    order = [init.name for init in float_initializers(model)]
    chosen, all_buffers, owned = _segment_names(model, order, trainable, buffers, segment_buffers, optimizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = num_classes if num_classes is not None else _num_classes(model, logits_name)
    frozen = [name for name in order if name not in chosen]
    loss = lm_loss_block() if task == "causal-lm" else None
    loss_name, logits_out = generate_checked(
        model, chosen, frozen, out, optimizer, logits_name, order, classes if kd else None, loss, forward_onnx.parent
    )
    manifest = SegmentManifest(
        input_name=input_name,
        label_name=LABEL_NAME,
        logits_name=logits_out,
        loss_name=loss_name,
        order=tuple(order),
        shapes=initializer_shapes(model),
        trainable=tuple(chosen),
        buffers=tuple(all_buffers),
        segment_buffers=tuple(owned),
        optimizer=optimizer,
        num_classes=classes,
        input_shape=_input_shape(model, input_name),
        kd_inputs=(TEACHER_NAME, ALPHA_NAME, TEMPERATURE_NAME, ADJUST_NAME) if kd else (),
        task=task,
    )
    write_manifest(out, manifest)
    logger.info("generated %s artifacts for %d trainable tensors in %s", optimizer, len(chosen), out)
    return manifest
