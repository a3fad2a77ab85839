"""The segment manifest: what a training-artifact bundle holds, as ``manifest.json``.

The contract between the coordinator, which writes it when it builds a bundle
(:mod:`coordinator.build`), and every trainer backend of the agent, which reads it. Stdlib only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.errors import EdgeAgentError

MANIFEST_NAME = "manifest.json"
PROBE_FILE = "probe_model.onnx"  # split fronts: the forward-only graph that computes the activations
FORMAT_VERSION = 1
OPTIMIZERS = ("adamw", "sgd")
IGNORE_INDEX = -100  # causal-lm labels: a position with no next token (padding) counts for nothing
TASKS = ("classify", "causal-lm")  # causal-lm: input int64 token ids [N, T], labels int64 [N, T], logits [N, T, V]
KINDS = ("ort", "portable")  # ORT training artifacts, or graphs plain onnxruntime runs (see PortableTrainer)


class ManifestError(EdgeAgentError):
    """manifest.json is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class SegmentManifest:
    input_name: str  # graph input holding the batch, float32 [N, *input_shape]
    label_name: str  # graph input holding the labels, int64 [N]
    logits_name: str  # graph output holding the logits [N, num_classes]
    loss_name: str  # graph output holding the mean cross-entropy (scalar)
    order: tuple[str, ...]  # every float tensor of the model, in the flat-buffer order
    shapes: Mapping[str, tuple[int, ...]]  # shape of each tensor in ``order``
    trainable: tuple[str, ...]  # parameters this segment updates (subset of ``order``)
    buffers: tuple[str, ...]  # every float buffer (BN running stats): updated by training, never by gradients
    segment_buffers: tuple[str, ...]  # the buffers of the segment's layer groups (every buffer follows the data)
    optimizer: str  # "adamw" | "sgd"
    num_classes: int
    input_shape: tuple[int, ...]  # per-sample input shape, e.g. (1, 28, 28)
    format: int = FORMAT_VERSION
    # Portable bundles only (absent from an "ort" manifest, so those read and hash as before):
    kind: str = "ort"
    train_graph: str = ""  # inputs (input, labels, every tensor in ``order``); outputs loss, logits, grads, stats
    eval_graph: str = ""  # inputs as train_graph; outputs (loss, logits), BatchNorm in inference mode
    grad_outputs: Mapping[str, str] = field(default_factory=dict)  # trainable name -> its gradient output
    buffer_outputs: Mapping[str, str] = field(default_factory=dict)  # every buffer -> its updated value output
    # Knowledge-distillation bundles only (absent otherwise): the extra graph inputs (teacher logits
    # float [N, num_classes], alpha and temperature float scalars, and in bundles that have it the logit
    # adjustment float [num_classes]), in that order. See coordinator.build.kd_loss.
    kd_inputs: tuple[str, ...] = ()
    # Split-learning front bundles only (absent otherwise): the per-sample shape of the activations the
    # front outputs (``logits_name``); ``label_name`` then names the input taking dL/d(activations) and
    # the loss is the surrogate sum(activations * gradient). See coordinator.build.split_artifacts.
    activation_shape: tuple[int, ...] = ()
    # Language-model bundles only (absent otherwise): "causal-lm" means the input holds int64 token ids
    # [N, T] (``input_shape`` = (T,)), the labels int64 next-token ids [N, T] (-100 = no target) and
    # ``num_classes`` is the vocabulary size. See coordinator.build.lm_loss.
    task: str = "classify"

    @property
    def split_front(self) -> bool:
        """Whether this bundle trains a split-learning front from gradients the coordinator sends."""
        return bool(self.activation_shape)

    @property
    def kd(self) -> bool:
        """Whether the loss is CE + knowledge distillation (the graphs take ``kd_inputs``)."""
        return bool(self.kd_inputs)

    @property
    def logit_adjust(self) -> bool:
        """Whether the graphs take a logit adjustment (KD bundles built since it exists)."""
        return len(self.kd_inputs) == 4

    def __post_init__(self) -> None:
        known = set(self.order)
        if len(known) != len(self.order):
            raise ManifestError("manifest order has duplicate names")
        if set(self.shapes) != known:
            raise ManifestError("manifest shapes do not match its order")
        for field_name in ("trainable", "buffers", "segment_buffers"):
            unknown = set(getattr(self, field_name)) - known
            if unknown:
                raise ManifestError(f"manifest {field_name} names unknown tensors: {sorted(unknown)}")
        if not set(self.segment_buffers) <= set(self.buffers) or set(self.buffers) & set(self.trainable):
            raise ManifestError("manifest buffers overlap the trainable set or miss segment buffers")
        if self.optimizer not in OPTIMIZERS:
            raise ManifestError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if self.task not in TASKS:
            raise ManifestError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        if self.kd_inputs and len(self.kd_inputs) not in (3, 4):
            raise ManifestError("manifest kd_inputs names teacher logits, alpha, temperature (and logit adjustment)")
        self._check_kind()

    def _check_kind(self) -> None:
        if self.kind not in KINDS:
            raise ManifestError(f"unknown artifact kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.kind == "ort":
            if self.train_graph or self.eval_graph or self.grad_outputs or self.buffer_outputs:
                raise ManifestError("an ort manifest names no portable graphs or outputs")
            return
        if not self.train_graph or not self.eval_graph:
            raise ManifestError("a portable manifest names its train and eval graphs")
        if set(self.grad_outputs) != set(self.trainable):
            raise ManifestError("portable manifest grad_outputs do not match its trainable set")
        if set(self.buffer_outputs) != set(self.buffers):
            raise ManifestError("portable manifest buffer_outputs do not match its buffers")

    def to_json(self) -> str:
        data = {
            "format": self.format,
            "input_name": self.input_name,
            "label_name": self.label_name,
            "logits_name": self.logits_name,
            "loss_name": self.loss_name,
            "order": list(self.order),
            "shapes": {name: list(self.shapes[name]) for name in self.order},
            "trainable": list(self.trainable),
            "buffers": list(self.buffers),
            "segment_buffers": list(self.segment_buffers),
            "optimizer": self.optimizer,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
        }
        if self.kind != "ort":
            data |= {
                "kind": self.kind,
                "train_graph": self.train_graph,
                "eval_graph": self.eval_graph,
                "grad_outputs": {name: self.grad_outputs[name] for name in self.trainable},
                "buffer_outputs": {name: self.buffer_outputs[name] for name in self.buffers},
            }
        if self.kd_inputs:
            data |= {"kd": True, "kd_inputs": list(self.kd_inputs)}
        if self.activation_shape:
            data["activation_shape"] = list(self.activation_shape)
        if self.task != "classify":
            data["task"] = self.task
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SegmentManifest:
        try:
            data = json.loads(text)
            if data["format"] != FORMAT_VERSION:
                raise ManifestError(f"unsupported manifest format {data['format']!r} (this agent reads 1)")
            return cls(
                input_name=str(data["input_name"]),
                label_name=str(data["label_name"]),
                logits_name=str(data["logits_name"]),
                loss_name=str(data["loss_name"]),
                order=tuple(map(str, data["order"])),
                shapes={str(k): tuple(int(d) for d in v) for k, v in data["shapes"].items()},
                trainable=tuple(map(str, data["trainable"])),
                buffers=tuple(map(str, data["buffers"])),
                segment_buffers=tuple(map(str, data["segment_buffers"])),
                optimizer=str(data["optimizer"]),
                num_classes=int(data["num_classes"]),
                input_shape=tuple(int(d) for d in data["input_shape"]),
                kind=str(data.get("kind", "ort")),
                train_graph=str(data.get("train_graph", "")),
                eval_graph=str(data.get("eval_graph", "")),
                grad_outputs={str(k): str(v) for k, v in data.get("grad_outputs", {}).items()},
                buffer_outputs={str(k): str(v) for k, v in data.get("buffer_outputs", {}).items()},
                kd_inputs=tuple(map(str, data.get("kd_inputs", []))) if data.get("kd", False) else (),
                activation_shape=tuple(int(d) for d in data.get("activation_shape", [])),
                task=str(data.get("task", "classify")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"malformed manifest: {exc!r}") from exc


def read_manifest(directory: Path) -> SegmentManifest:
    path = Path(directory) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    return SegmentManifest.from_json(text)
