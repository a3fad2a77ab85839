"""The portable backend (``backend = "portable"``): plain ``onnxruntime`` + numpy. No torch, no ORT training.

A portable bundle (built by :mod:`coordinator.build.lowering`) holds two standard-ONNX
graphs whose inputs are the batch and every tensor of the model:

    train graph: (loss, logits, gradient of each trainable tensor, updated running stats of every BatchNorm)
    eval graph:  (loss, logits), BatchNorm in inference mode

The trainer keeps the weights as numpy arrays, runs the train graph once per
batch and applies the optimizer update in numpy (:mod:`edge_agent.optim`, the
same rules as ONNX Runtime's kernels). Like :class:`~edge_agent.ort_trainer.OrtTrainer`:
BatchNorm normalises with batch statistics during training and every layer's
running stats follow the data (inside and outside the segment); parameters
outside the segment never change; ``set_weights`` starts a fresh optimizer;
dropout masks come from ``onnxruntime.set_seed(spec.seed)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.data import Inputs
from edge_agent.distill import TEACHER_BATCH, check_kd, kd_extras, step_adjust, step_extras, teacher_logits
from edge_agent.optim import Optimizer, make_optimizer, proximal_pull
from edge_agent.ort_training import import_onnxruntime, ort_errors
from edge_agent.protocol.manifest import SegmentManifest
from edge_agent.segment_checks import check_data, check_tensors, open_manifest
from edge_agent.trainer import (
    EvalStats,
    StepCallback,
    TrainerError,
    TrainSpec,
    TrainStats,
    plan_steps,
    run_eval,
    run_steps,
)

logger = logging.getLogger(__name__)


class _Graph:
    """One InferenceSession and the names it is fed and read by."""

    def __init__(self, path: Path, options: Any, outputs: list[str]) -> None:
        onnxruntime = import_onnxruntime()
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [item.name for item in self.session.get_inputs()]
        self.outputs = outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(self.outputs, {name: feeds[name] for name in self.inputs}))


class PortableTrainer:
    """Trainer backed by plain onnxruntime (InferenceSession) and a numpy optimizer."""

    backend = "portable"

    def __init__(self, threads: int = 0, log_severity: int = 3) -> None:
        self.threads = threads  # intra-op threads; 0 lets ONNX Runtime choose
        self.log_severity = log_severity  # 3 = errors only
        self._dir: Path | None = None
        self._manifest: SegmentManifest | None = None
        self._train: _Graph | None = None
        self._eval: _Graph | None = None
        self._tensors: dict[str, np.ndarray] | None = None
        self._optimizer: Optimizer | None = None

    @property
    def manifest(self) -> SegmentManifest:
        if self._manifest is None:
            raise TrainerError("no artifacts open; call open() first")
        return self._manifest

    def open(self, artifact_dir: Path) -> None:
        directory = Path(artifact_dir)
        manifest = open_manifest(directory)
        if manifest.kind != "portable":
            raise TrainerError(f"{directory} holds {manifest.kind!r} artifacts; this backend needs a portable bundle")
        missing = [name for name in (manifest.train_graph, manifest.eval_graph) if not (directory / name).is_file()]
        if missing:
            raise TrainerError(f"artifact directory {directory} lacks {', '.join(missing)}")
        self._dir, self._manifest = directory, manifest
        self._train = self._eval = None
        self._tensors, self._optimizer = None, None
        self._train_graph()  # fail here, not at the first step, if the graph does not load
        logger.info(
            "opened portable %s segment: %d trainable of %d tensors",
            manifest.optimizer,
            len(manifest.trainable),
            len(manifest.order),
        )

    def set_weights(self, tensors: Mapping[str, np.ndarray]) -> None:
        self._tensors = None  # the previous weights go first
        self._tensors = check_tensors(self.manifest, tensors)
        self._optimizer = make_optimizer(self.manifest.optimizer)

    def get_weights(self) -> dict[str, np.ndarray]:
        tensors = self._require_weights()
        return {name: tensors[name].copy() for name in self.manifest.order}

    def release_weights(self) -> dict[str, np.ndarray]:
        """The trainer's own arrays (no copy); sessions and optimizer state are freed."""
        tensors = self._require_weights()
        self._tensors, self._optimizer, self._train, self._eval = None, None, None, None
        return {name: tensors[name] for name in self.manifest.order}

    def train(
        self,
        x: Inputs,
        y: np.ndarray,
        spec: TrainSpec,
        on_step: StepCallback | None = None,
        teacher: np.ndarray | None = None,
    ) -> TrainStats:
        """Train; with ``spec.kd_alpha > 0`` distil from ``teacher`` (default: the current weights' logits)."""
        tensors = self._require_weights()
        manifest = self.manifest
        x, y = check_data(manifest, x, y)
        batch, _, _ = plan_steps(spec, len(x))
        kd = check_kd(manifest, spec)
        if kd and teacher is None:
            teacher = self.teacher_logits(x, y, batch)
        adjust = step_adjust(manifest, spec, y)
        anchor = {n: tensors[n].copy() for n in manifest.trainable} if spec.prox_mu > 0 else {}
        import_onnxruntime().set_seed(spec.seed)  # dropout masks
        try:
            graph = self._train_graph()

            def step(_: int, idx: np.ndarray) -> float:
                extras = step_extras(manifest, spec, teacher if kd else None, idx, adjust)
                loss = self._step(graph, tensors, x[idx], y[idx], spec.lr, extras)
                for name, start in anchor.items():  # FedProx
                    proximal_pull(tensors[name], start, spec.lr * spec.prox_mu)
                return loss

            return run_steps(len(x), spec, step, on_step)
        except ort_errors() as exc:
            raise TrainerError(f"training step failed: {exc}") from exc

    def evaluate(self, x: Inputs, y: np.ndarray, batch_size: int = 256) -> EvalStats:
        tensors = self._require_weights()
        x, y = check_data(self.manifest, x, y)
        try:
            return run_eval(x, y, batch_size, lambda xb, yb: self._forward(tensors, xb, yb))
        except ort_errors() as exc:
            raise TrainerError(f"evaluation failed: {exc}") from exc

    def teacher_logits(self, x: Inputs, y: np.ndarray, batch_size: int = TEACHER_BATCH) -> np.ndarray:
        """Logits [N, num_classes] of the current weights (eval graph: BatchNorm in inference mode), in
        batches of ``batch_size`` rows."""
        tensors = self._require_weights()
        x, y = check_data(self.manifest, x, y)
        try:
            return teacher_logits(lambda xb, yb: self._forward(tensors, xb, yb)[1], x, y, batch_size)
        except ort_errors() as exc:
            raise TrainerError(f"teacher pass failed: {exc}") from exc

    # -- helpers ---------------------------------------------------------------------------------

    def _forward(self, tensors: Mapping[str, np.ndarray], xb: np.ndarray, yb: np.ndarray) -> tuple[float, np.ndarray]:
        """(loss, logits) of a batch from the eval graph (BatchNorm in inference mode, plain cross-entropy);
        logits [N, classes], or [N, T, vocab] for a language model."""
        loss, logits = self._eval_graph().run(self._feeds(tensors, xb, yb))
        manifest = self.manifest
        rows = (len(xb), *manifest.input_shape) if manifest.task == "causal-lm" else (len(xb),)
        return float(loss), np.asarray(logits).reshape(*rows, manifest.num_classes)

    def _step(
        self,
        graph: _Graph,
        tensors: dict[str, np.ndarray],
        xb: np.ndarray,
        yb: np.ndarray,
        lr: float,
        extras: Mapping[str, np.ndarray],
    ) -> float:
        manifest = self.manifest
        outputs = graph.run({**self._feeds(tensors, xb, yb), **extras})
        trained = len(manifest.trainable)
        grads = dict(zip(manifest.trainable, outputs[2 : 2 + trained], strict=True))
        for name, value in zip(manifest.buffers, outputs[2 + trained :], strict=True):
            tensors[name] = np.asarray(value, dtype=np.float32)  # running stats, updated by the forward pass
        assert self._optimizer is not None  # set with the weights
        self._optimizer.step(tensors, grads, lr)
        return float(outputs[0])

    def _feeds(self, tensors: Mapping[str, np.ndarray], xb: np.ndarray, yb: np.ndarray) -> dict[str, np.ndarray]:
        manifest = self.manifest
        extras = kd_extras(manifest, len(xb))  # alpha 0 (plain cross-entropy) unless the step overrides them
        return {manifest.input_name: xb, manifest.label_name: yb, **extras, **tensors}

    def _options(self) -> Any:
        options = import_onnxruntime().SessionOptions()
        options.log_severity_level = self.log_severity
        options.enable_cpu_mem_arena = False  # as OrtTrainer: the arena kept memory after evaluation
        # the memory pattern (one block planned from the first run) added ~20 MiB to every VGG-11 step
        options.enable_mem_pattern = False
        if self.threads > 0:
            options.intra_op_num_threads = self.threads
        return options

    def _load(self, file_name: str, outputs: list[str]) -> _Graph:
        assert self._dir is not None  # the manifest is open
        manifest = self.manifest
        try:
            graph = _Graph(self._dir / file_name, self._options(), outputs)
        except ort_errors() as exc:
            raise TrainerError(f"cannot load {file_name} in {self._dir}: {exc}") from exc
        unknown = set(graph.inputs) - {manifest.input_name, manifest.label_name, *manifest.kd_inputs, *manifest.order}
        if unknown:
            raise TrainerError(f"{file_name} wants inputs the manifest does not name: {sorted(unknown)[:5]}")
        return graph

    def _train_graph(self) -> _Graph:
        if self._train is None:
            manifest = self.manifest
            outputs = [manifest.loss_name, manifest.logits_name]
            outputs += [manifest.grad_outputs[name] for name in manifest.trainable]
            outputs += [manifest.buffer_outputs[name] for name in manifest.buffers]
            self._train = self._load(manifest.train_graph, outputs)
        return self._train

    def _eval_graph(self) -> _Graph:
        if self._eval is None:
            manifest = self.manifest
            self._eval = self._load(manifest.eval_graph, [manifest.loss_name, manifest.logits_name])
        return self._eval

    def _require_weights(self) -> dict[str, np.ndarray]:
        self.manifest  # noqa: B018 (raises if not open)
        if self._tensors is None:
            raise TrainerError("no weights loaded; call set_weights() first")
        return self._tensors
