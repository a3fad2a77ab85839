"""PyTorch -> ONNX export: the forward model every segment's artifacts are built from, and the
inference model handed out at the end of a trial.

The forward model comes from the legacy (TorchScript) exporter at opset 17 in TRAINING mode,
without constant folding, so every ``named_parameters()``/float buffer name survives as an
initializer name: those names are the wire names. The graph fixes applied here are the
ones ORT-NOTES.md measured (BatchNorm running stats, LayerNorm outputs, IR version).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from coordinator.errors import CoordinatorError
from coordinator.onnx_external import data_file, external_threshold, externalize, tensor_views, uses_external_data
from models import layer_groups

logger = logging.getLogger(__name__)

OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime 1.19.2 refuses newer IR versions
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
FORWARD_FILE = "forward.onnx"
TASK_CLASSIFY = "classify"  # float input [N, *input_shape] -> logits [N, num_classes]
TASK_CAUSAL_LM = "causal-lm"  # int64 token ids [N, T] -> logits [N, T, vocab]
TASKS = (TASK_CLASSIFY, TASK_CAUSAL_LM)
_EXPORT_BATCH = 2  # BatchNorm in training mode needs more than one value per channel


class ExportError(CoordinatorError):
    """A model cannot be exported, or its tensors do not match what was expected."""


@dataclass(frozen=True)
class LayerGroup:
    name: str  # module-path prefix, e.g. "conv1" or "features.3"
    params: tuple[str, ...]  # trainable parameter names, forward order
    buffers: tuple[str, ...]  # non-trainable float tensors (BatchNorm running mean/var)


@dataclass(frozen=True)
class ForwardModel:
    onnx_path: Path  # forward ONNX, training mode
    input_name: str  # "input", float32 [N, *input_shape]
    output_name: str  # "logits", float32 [N, num_classes]
    order: tuple[str, ...]  # every float initializer (params + float buffers), ONNX initializer order
    tensors: dict[str, np.ndarray]  # initial float32 values by name (pre-export state)
    groups: tuple[LayerGroup, ...]  # input side first; they partition ``order``
    input_shape: tuple[int, ...]  # per sample, e.g. (1, 28, 28); (T,) for a language model
    num_classes: int  # the vocabulary size for a language model
    task: str = TASK_CLASSIFY  # TASK_CAUSAL_LM: int64 token ids in, logits [N, T, V] out, next-token loss

    def group(self, name: str) -> LayerGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise ExportError(f"no layer group {name!r}; groups: {', '.join(g.name for g in self.groups)}")

    def params_of(self, group_names: Iterable[str]) -> tuple[str, ...]:
        """Trainable parameter names of the given groups, in forward order."""
        wanted = {name for group in group_names for name in self.group(group).params}
        return tuple(name for name in self.order if name in wanted)

    def buffers_of(self, group_names: Iterable[str]) -> tuple[str, ...]:
        wanted = {name for group in group_names for name in self.group(group).buffers}
        return tuple(name for name in self.order if name in wanted)

    @property
    def buffers(self) -> tuple[str, ...]:
        return self.buffers_of(group.name for group in self.groups)


def model_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    """Every parameter and float buffer as a float32 numpy copy, by wire name (state_dict order)."""
    return {
        name: value.detach().cpu().to(torch.float32).numpy().copy()
        for name, value in model.state_dict().items()
        if value.is_floating_point()
    }


def load_tensors(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy every float tensor of ``model`` from ``tensors`` (all names required, shapes checked)."""
    state = {name: value for name, value in model.state_dict().items() if value.is_floating_point()}
    missing = [name for name in state if name not in tensors]
    unknown = sorted(set(tensors) - set(state))
    if missing or unknown:
        raise ExportError(f"tensors do not match the model: missing {missing}, unknown {unknown}")
    with torch.no_grad():
        for name, target in state.items():
            value = np.asarray(tensors[name])
            if tuple(value.shape) != tuple(target.shape):
                raise ExportError(f"tensor {name!r} has shape {value.shape}, expected {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))


def _torch_export(
    model: nn.Module,
    input_shape: Sequence[int],
    path: Path,
    training: bool,
    output_name: str = OUTPUT_NAME,
    task: str = TASK_CLASSIFY,
) -> None:
    dtype = torch.int64 if task == TASK_CAUSAL_LM else torch.float32  # token ids, or images/features
    dummy = torch.zeros((_EXPORT_BATCH, *input_shape), dtype=dtype)
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings(), torch.random.fork_rng():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            training=mode,
            do_constant_folding=not training,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
        )


def _float_bytes(model: nn.Module) -> int:
    return sum(value.numel() * 4 for value in model.state_dict().values() if value.is_floating_point())


def _overwrite_initializers(proto: onnx.ModelProto, tensors: Mapping[str, np.ndarray]) -> None:
    """Put the pre-export values back (the export's forward pass moved BN running stats)."""
    for index, init in enumerate(proto.graph.initializer):
        if init.name in tensors:
            proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(tensors[init.name], init.name))


def fix_layernorm_outputs(proto: onnx.ModelProto) -> int:
    """Give each single-output LayerNormalization its mean and inv-std-dev outputs (ORT's grad needs them)."""
    fixed = 0
    for index, node in enumerate(proto.graph.node):
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            stem = node.name or f"LayerNormalization_{index}"
            node.output.extend([f"{stem}/saved_mean", f"{stem}/saved_inv_std_dev"])
            fixed += 1
    return fixed


def check_ir_version(proto: onnx.ModelProto, what: str) -> None:
    if proto.ir_version > MAX_IR_VERSION:
        raise ExportError(f"{what} has IR version {proto.ir_version} > {MAX_IR_VERSION}; pin onnx<1.18")


def _groups(model: nn.Module, order: Sequence[str]) -> tuple[LayerGroup, ...]:
    """Layer groups over ``order``; every name must fall in exactly one group."""
    prefixes = layer_groups(model)
    params = {name for name, _ in model.named_parameters()}
    owner: dict[str, str] = {}
    for name in order:
        matches = [prefix for prefix in prefixes if name.startswith(prefix + ".")]
        if len(matches) != 1:
            raise ExportError(f"tensor {name!r} belongs to {len(matches)} layer groups {matches}, not exactly one")
        owner[name] = matches[0]
    return tuple(
        LayerGroup(
            name=prefix,
            params=tuple(n for n in order if owner[n] == prefix and n in params),
            buffers=tuple(n for n in order if owner[n] == prefix and n not in params),
        )
        for prefix in prefixes
    )


def _export_training_graph(
    model: nn.Module,
    input_shape: Sequence[int],
    path: Path,
    output_name: str = OUTPUT_NAME,
    task: str = TASK_CLASSIFY,
) -> None:
    """Export in training mode, leaving the torch model exactly as it was."""
    snapshot = {name: value.detach().clone() for name, value in model.named_buffers()}  # a forward pass moves
    was_training = model.training  # buffers only (BN running stats); parameters stay, so no copy of those
    try:
        model.train()
        _torch_export(model, input_shape, path, training=True, output_name=output_name, task=task)
    finally:
        with torch.no_grad():
            for name, value in model.named_buffers():
                value.copy_(snapshot[name])
        model.train(was_training)


def export_forward(
    model: nn.Module,
    input_shape: tuple[int, ...],
    num_classes: int,
    out_dir: Path,
    task: str = TASK_CLASSIFY,
    threshold: int | None = None,
) -> ForwardModel:
    """Export the training-mode forward ONNX to ``out_dir/forward.onnx`` and describe it.

    ``task``: TASK_CLASSIFY (float input) or TASK_CAUSAL_LM (int64 token ids [N, T], ``input_shape`` = (T,),
    ``num_classes`` = vocabulary size). Tied weights must be held once (see models.gpt).
    A model whose float tensors exceed ``threshold`` bytes (default: just under protobuf's 2 GB limit, or
    ``$SNAKE_ONNX_EXTERNAL_BYTES``) keeps them in ``forward.onnx.data`` (:mod:`coordinator.onnx_external`);
    its ``ForwardModel.tensors`` are then read-only memory maps of that file.
    """
    if task not in TASKS:
        raise ExportError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FORWARD_FILE
    limit = external_threshold() if threshold is None else threshold
    external = _float_bytes(model) > limit
    data_file(path).unlink(missing_ok=True)
    if not external:
        tensors = model_tensors(model)
    _export_training_graph(model, input_shape, path, task=task)
    proto = onnx.load(path, load_external_data=False)  # torch writes external data itself above 2 GB
    external = external or uses_external_data(proto)
    if not external:
        _overwrite_initializers(proto, tensors)
    if fix_layernorm_outputs(proto):
        logger.debug("added saved mean/inv-std outputs to LayerNormalization nodes")
    check_ir_version(proto, "forward model")
    order = tuple(init.name for init in proto.graph.initializer if init.data_type == onnx.TensorProto.FLOAT)
    if external:  # graph in forward.onnx, tensors in forward.onnx.data, read back as memory maps
        size = externalize(proto, path, order)
        logger.info("forward model tensors (%d bytes) are external data in %s", size, data_file(path).name)
        tensors = tensor_views(proto, path, order)
    onnx.save(proto, path)
    if set(order) != set(tensors):
        raise ExportError(
            f"ONNX initializers differ from the model's float tensors: only in ONNX "
            f"{sorted(set(order) - set(tensors))}, only in torch {sorted(set(tensors) - set(order))} "
            "(unused or tied parameters?)"
        )
    logger.info("exported forward model: %d tensors, %d bytes", len(order), path.stat().st_size)
    return ForwardModel(
        onnx_path=path,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        order=order,
        tensors={name: tensors[name] for name in order},
        groups=_groups(model, order),
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        task=task,
    )


def export_inference(
    model: nn.Module,
    input_shape: tuple[int, ...],
    path: Path,
    tensors: Mapping[str, np.ndarray] | None = None,
    task: str = TASK_CLASSIFY,
) -> Path:
    """Export an eval-mode ONNX for deployment (``input`` -> ``logits``, dynamic batch).

    ``tensors`` (if given) are loaded into a copy of ``model`` first; ``model`` is not changed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    deployed = copy.deepcopy(model)
    if tensors is not None:
        load_tensors(deployed, tensors)
    deployed.eval()
    _torch_export(deployed, input_shape, target, training=False, task=task)
    proto = onnx.load(target, load_external_data=False)
    check_ir_version(proto, "inference model")
    if uses_external_data(proto):  # over 2 GB: torch wrote one file per tensor; keep one data file instead
        externalize(proto, target, [init.name for init in proto.graph.initializer if init.dims])
        onnx.save(proto, target)
    logger.info("exported inference model to %s (%d bytes)", target, target.stat().st_size)
    return target


FRONT_FILE = "front.onnx"
ACTIVATIONS_NAME = "activations"


def export_front(model: nn.Module, front: nn.Module, input_shape: tuple[int, ...], out_dir: Path) -> Path:
    """Export a split-learning front (``input`` -> ``activations``) in training mode, like the forward model.

    ``front`` shares ``model``'s modules (:func:`models.split.split_model`); tensors it registers but
    never uses are dropped, so the graph holds exactly the front's layer groups under their wire names.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FRONT_FILE
    tensors = model_tensors(model)
    _export_training_graph(front, input_shape, path, output_name=ACTIVATIONS_NAME)
    proto = onnx.load(path)
    used = {name for node in proto.graph.node for name in node.input}
    kept = [init for init in proto.graph.initializer if init.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    _overwrite_initializers(proto, tensors)
    check_ir_version(proto, "front model")
    onnx.save(proto, path)
    unknown = sorted(i.name for i in kept if i.data_type == onnx.TensorProto.FLOAT and i.name not in tensors)
    if unknown:
        raise ExportError(f"front initializers that are not model tensors: {unknown}")
    logger.info("exported split front: %d tensors, %d bytes", len(kept), path.stat().st_size)
    return path
