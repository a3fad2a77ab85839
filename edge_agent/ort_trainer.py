"""The ONNX Runtime on-device training backend (``backend = "ort"``). Torch-free.

One :class:`OrtTrainer` holds one segment's artifact directory (see
:mod:`coordinator.build.ort_artifacts`). Weights move in and out as one flat float32
buffer in the manifest's order; ``set_weights`` starts a fresh session and a
fresh optimizer, so a hop's result depends only on its weights, data and spec.

BatchNorm layers normalise with batch statistics during training, as in torch
(``model.train()`` with frozen parameters), and ONNX Runtime updates every
layer's running statistics in place. Those are statistics, not parameters: they
track the data this hop saw and travel with the model, so evaluation (running
statistics) agrees with training (batch statistics). Parameters outside the
segment never change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.data import Inputs
from edge_agent.distill import TEACHER_BATCH, check_kd, kd_extras, step_adjust, step_extras, teacher_logits
from edge_agent.optim import proximal_pull
from edge_agent.ort_training import import_onnxruntime, ort_errors, training_module
from edge_agent.protocol.manifest import SegmentManifest
from edge_agent.segment_checks import check_data, checked_tensors, manifest_floats, open_manifest
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

ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "nominal_checkpoint")


class _Session:
    """ONNX Runtime objects for one set of weights: checkpoint state, module, optimizer."""

    def __init__(
        self, directory: Path, options: Any, tensors: Iterator[tuple[str, np.ndarray]], manifest: SegmentManifest
    ) -> None:
        api = training_module("api")

        self.state = api.CheckpointState.load_checkpoint(str(directory / "nominal_checkpoint"))
        self.module = api.Module(
            directory / "training_model.onnx", self.state, directory / "eval_model.onnx", session_options=options
        )
        expected = [manifest.input_name, manifest.label_name, *manifest.kd_inputs]
        if list(self.module.input_names()) != expected:
            raise TrainerError(
                f"training graph inputs {self.module.input_names()} differ from the manifest's {expected}"
            )
        size, expected_size = self.module.get_parameters_size(False), manifest_floats(manifest)
        if size != expected_size:
            raise TrainerError(f"training graph holds {size} floats, the manifest describes {expected_size}")
        # A nominal state takes only a whole flat buffer. Zeros from calloc are pages nobody has touched:
        # ONNX Runtime reads them as the kernel's shared zero page, so they cost no resident memory. After
        # that the state is whole, and each tensor is written into the module's own storage (``data`` is a
        # view of it), one at a time: loading peaks at ONNX Runtime's copy plus one tensor, not plus two
        # more copies of the model (a flat buffer, and the source tensors, all resident at once).
        onnxruntime = import_onnxruntime()
        zeros = np.zeros(size, dtype=np.float32)
        self.module.copy_buffer_to_parameters(onnxruntime.OrtValue.ortvalue_from_numpy(zeros)._ortvalue, False)
        del zeros
        parameters = self.state.parameters
        first = True
        for name, value in tensors:
            parameters[name].data[...] = value
            if (
                first
                and value.size
                and not np.array_equal(parameters[name].data, np.asarray(value, np.float32), equal_nan=True)
            ):  # once: cheap
                raise TrainerError(
                    "this onnxruntime build hands out copies of parameters, not views: weights cannot be loaded "
                    "tensor by tensor (onnxruntime-training 1.19.2 is the tested version)"
                )
            first = False
            del value
        # Only now: an optimizer created over a nominal (empty) checkpoint crashes on set_learning_rate.
        self.optimizer = api.Optimizer(directory / "optimizer_model.onnx", self.module)

    def trainable(self) -> np.ndarray:
        """The trainable parameters in one float32 buffer we own."""
        onnxruntime = import_onnxruntime()

        out = np.empty(self.module.get_parameters_size(True), dtype=np.float32)
        self.module._model.copy_parameters_to_buffer(onnxruntime.OrtValue.ortvalue_from_numpy(out)._ortvalue, True)
        return out

    def pull_toward(self, anchor: np.ndarray, rate: float) -> None:
        """FedProx: move the trainable parameters ``rate`` of the way back to ``anchor`` (:func:`proximal_pull`)."""
        onnxruntime = import_onnxruntime()

        params = self.trainable()
        proximal_pull(params, anchor, rate)
        self.module.copy_buffer_to_parameters(onnxruntime.OrtValue.ortvalue_from_numpy(params)._ortvalue, True)

    def flat(self) -> np.ndarray:
        """Every parameter in one float32 buffer we own (copied straight into it: one copy, not three)."""
        onnxruntime = import_onnxruntime()

        out = np.empty(self.module.get_parameters_size(False), dtype=np.float32)
        self.module._model.copy_parameters_to_buffer(onnxruntime.OrtValue.ortvalue_from_numpy(out)._ortvalue, False)
        return out


class OrtTrainer:
    """Trainer backed by onnxruntime-training (``onnxruntime.training.api``)."""

    backend = "ort"

    def __init__(self, threads: int = 0, log_severity: int = 3) -> None:
        self.threads = threads  # intra-op threads; 0 lets ONNX Runtime choose
        self.log_severity = log_severity  # 3 = errors only
        self._dir: Path | None = None
        self._manifest: SegmentManifest | None = None
        self._session: _Session | None = None

    @property
    def manifest(self) -> SegmentManifest:
        if self._manifest is None:
            raise TrainerError("no artifacts open; call open() first")
        return self._manifest

    def open(self, artifact_dir: Path) -> None:
        directory = Path(artifact_dir)
        missing = [name for name in ARTIFACT_FILES if not (directory / name).is_file()]
        if missing:
            raise TrainerError(f"artifact directory {directory} lacks {', '.join(missing)}")
        manifest = open_manifest(directory)
        self._dir, self._manifest, self._session = directory, manifest, None
        logger.info(
            "opened %s segment: %d trainable of %d tensors",
            manifest.optimizer,
            len(manifest.trainable),
            len(manifest.order),
        )

    def set_weights(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Load every tensor, one at a time (checked by name, shape and dtype): a mapping that produces
        its values on access (read from a file, say) never holds the whole model besides ONNX Runtime's copy."""
        self._session = None  # the previous session's weights go first
        checked = checked_tensors(self.manifest, tensors)
        del tensors
        assert self._dir is not None  # checked_tensors checked the manifest
        try:
            self._session = _Session(self._dir, self._options(), checked, self.manifest)
        except ort_errors() as exc:
            raise TrainerError(f"cannot load artifacts in {self._dir}: {exc}") from exc

    def get_weights(self) -> dict[str, np.ndarray]:
        return self._split(self._require_session().flat())

    def release_weights(self) -> dict[str, np.ndarray]:
        """ONNX Runtime's own parameter tensors, handed over without a copy: each ``data`` array keeps its
        tensor alive while the module, optimizer state and gradients go. A copy (``get_weights``) would put a
        second model beside the whole training state at the hop's end (OPT-1.3B: 5 GB more)."""
        session = self._require_session()
        parameters = session.state.parameters
        try:
            weights = {name: parameters[name].data.reshape(self.manifest.shapes[name]) for name in self.manifest.order}
        except ort_errors() as exc:
            raise TrainerError(f"cannot read the trained weights: {exc}") from exc
        self._session = None
        del session, parameters
        return weights

    def train(
        self,
        x: Inputs,
        y: np.ndarray,
        spec: TrainSpec,
        on_step: StepCallback | None = None,
        teacher: np.ndarray | None = None,
    ) -> TrainStats:
        """Train; with ``spec.kd_alpha > 0`` distil from ``teacher`` (default: the current weights' logits), with
        ``spec.logit_adjust > 0`` adjust the logits by the label prior of ``y``."""
        session = self._require_session()
        x, y = self._check_data(x, y)
        batch, _, _ = plan_steps(spec, len(x))
        kd = check_kd(self.manifest, spec)
        if kd and teacher is None:
            teacher = self.teacher_logits(x, y, batch)
        adjust = step_adjust(self.manifest, spec, y)
        anchor = session.trainable() if spec.prox_mu > 0 else None
        onnxruntime = import_onnxruntime()

        def step(_: int, idx: np.ndarray) -> float:
            extras = step_extras(self.manifest, spec, teacher if kd else None, idx, adjust)
            loss = self._step(session, x[idx], y[idx], extras)
            if anchor is not None:  # FedProx
                session.pull_toward(anchor, spec.lr * spec.prox_mu)
            return loss

        onnxruntime.set_seed(spec.seed)  # dropout masks
        try:
            session.optimizer.set_learning_rate(spec.lr)
            session.module.train()
            return run_steps(len(x), spec, step, on_step)
        except ort_errors() as exc:
            raise TrainerError(f"training step failed: {exc}") from exc

    def evaluate(self, x: Inputs, y: np.ndarray, batch_size: int = 256) -> EvalStats:
        session = self._require_session()
        x, y = self._check_data(x, y)
        try:
            session.module.eval()
            return run_eval(x, y, batch_size, lambda xb, yb: self._forward(session, xb, yb))
        except ort_errors() as exc:
            raise TrainerError(f"evaluation failed: {exc}") from exc
        finally:
            session.module.train()

    def teacher_logits(self, x: Inputs, y: np.ndarray, batch_size: int = TEACHER_BATCH) -> np.ndarray:
        """Logits [N, num_classes] of the current weights (eval graph: BatchNorm in inference mode), in
        batches of ``batch_size`` rows."""
        session = self._require_session()
        x, y = self._check_data(x, y)
        try:
            session.module.eval()
            return teacher_logits(lambda xb, yb: self._forward(session, xb, yb)[1], x, y, batch_size)
        except ort_errors() as exc:
            raise TrainerError(f"teacher pass failed: {exc}") from exc
        finally:
            session.module.train()

    # -- helpers ---------------------------------------------------------------------------------

    def _options(self) -> Any:
        onnxruntime = import_onnxruntime()

        options = onnxruntime.SessionOptions()
        options.log_severity_level = self.log_severity
        options.enable_cpu_mem_arena = False  # measured: the arena kept ~100 MiB per session after evaluation
        if self.threads > 0:
            options.intra_op_num_threads = self.threads
        return options

    def _require_session(self) -> _Session:
        self.manifest  # noqa: B018 (raises if not open)
        if self._session is None:
            raise TrainerError("no weights loaded; call set_weights() first")
        return self._session

    @staticmethod
    def _outputs(outputs: Any, manifest: SegmentManifest) -> tuple[float, np.ndarray]:
        loss, logits = outputs[0], outputs[1]  # graph outputs: (loss, logits)
        rows = (len(logits), *manifest.input_shape) if manifest.task == "causal-lm" else (len(logits),)
        return float(loss), np.asarray(logits).reshape(*rows, manifest.num_classes)

    def _forward(self, session: _Session, xb: np.ndarray, yb: np.ndarray) -> tuple[float, np.ndarray]:
        """(loss, logits) of a batch; the module's mode is the caller's (eval: plain cross-entropy, alpha 0)."""
        return self._outputs(session.module(xb, yb, *kd_extras(self.manifest, len(xb)).values()), self.manifest)

    def _step(self, session: _Session, xb: np.ndarray, yb: np.ndarray, extras: Mapping[str, np.ndarray]) -> float:
        loss, _ = self._outputs(session.module(xb, yb, *extras.values()), self.manifest)
        session.optimizer.step()
        session.module.lazy_reset_grad()
        return loss

    def _split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        manifest = self.manifest
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name in manifest.order:
            shape = manifest.shapes[name]
            size = int(np.prod(shape, dtype=np.int64))
            out[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        if offset != flat.size:
            raise TrainerError(f"session holds {flat.size} floats, the manifest describes {offset}")
        return out

    def _check_data(self, x: Inputs, y: np.ndarray) -> tuple[Inputs, np.ndarray]:
        return check_data(self.manifest, x, y)
