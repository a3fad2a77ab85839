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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.data import Inputs
from edge_agent.distill import TEACHER_BATCH, check_kd, kd_extras, teacher_logits
from edge_agent.ort_training import ort_errors, training_module
from edge_agent.protocol.manifest import ManifestError, SegmentManifest, read_manifest
from edge_agent.segment_checks import batch_order, check_data, check_tensors, plan_steps
from edge_agent.trainer import EvalStats, StepCallback, TrainerError, TrainSpec, TrainStats

logger = logging.getLogger(__name__)

ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "nominal_checkpoint")


class _Session:
    """ONNX Runtime objects for one set of weights: checkpoint state, module, optimizer."""

    def __init__(self, directory: Path, options: Any, flat: np.ndarray, manifest: SegmentManifest) -> None:
        api = training_module("api")
        import onnxruntime

        self.state = api.CheckpointState.load_checkpoint(str(directory / "nominal_checkpoint"))
        self.module = api.Module(
            directory / "training_model.onnx", self.state, directory / "eval_model.onnx", session_options=options
        )
        expected = [manifest.input_name, manifest.label_name, *manifest.kd_inputs]
        if list(self.module.input_names()) != expected:
            raise TrainerError(
                f"training graph inputs {self.module.input_names()} differ from the manifest's {expected}"
            )
        size = self.module.get_parameters_size(False)
        if size != flat.size:
            raise TrainerError(f"training graph holds {size} floats, the manifest describes {flat.size}")
        # 1.19.2 wants the raw C OrtValue here, not the Python wrapper.
        self.module.copy_buffer_to_parameters(onnxruntime.OrtValue.ortvalue_from_numpy(flat)._ortvalue, False)
        # Only now: an optimizer created over a nominal (empty) checkpoint crashes on set_learning_rate.
        self.optimizer = api.Optimizer(directory / "optimizer_model.onnx", self.module)

    def flat(self) -> np.ndarray:
        """Every parameter in one float32 buffer we own (copied straight into it: one copy, not three)."""
        import onnxruntime

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
        try:
            manifest = read_manifest(directory)
        except ManifestError as exc:
            raise TrainerError(str(exc)) from exc
        self._dir, self._manifest, self._session = directory, manifest, None
        logger.info(
            "opened %s segment: %d trainable of %d tensors",
            manifest.optimizer,
            len(manifest.trainable),
            len(manifest.order),
        )

    def set_weights(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Load every tensor. A caller that passes a temporary lets the inputs go before ONNX Runtime
        copies the buffer (one model copy less at the peak)."""
        self._session = None  # the previous session's weights go first
        flat = self._flatten(tensors)
        del tensors
        assert self._dir is not None  # _flatten checked the manifest
        try:
            self._session = _Session(self._dir, self._options(), flat, self.manifest)
        except ort_errors() as exc:
            raise TrainerError(f"cannot load artifacts in {self._dir}: {exc}") from exc

    def get_weights(self) -> dict[str, np.ndarray]:
        return self._split(self._require_session().flat())

    def release_weights(self) -> dict[str, np.ndarray]:
        weights = self.get_weights()
        self._session = None  # module, optimizer state and gradients go before the caller encodes
        return weights

    def train(
        self,
        x: Inputs,
        y: np.ndarray,
        spec: TrainSpec,
        on_step: StepCallback | None = None,
        teacher: np.ndarray | None = None,
    ) -> TrainStats:
        """Train; with ``spec.kd_alpha > 0`` distil from ``teacher`` (default: the current weights' logits)."""
        session = self._require_session()
        x, y = self._check_data(x, y)
        batch, _, total = plan_steps(spec, len(x))
        kd = check_kd(self.manifest, spec)
        if kd and teacher is None:
            teacher = self.teacher_logits(x, y, batch)
        import onnxruntime

        onnxruntime.set_seed(spec.seed)  # dropout masks
        started, steps, losses = time.perf_counter(), 0, [float("nan")]
        try:
            session.optimizer.set_learning_rate(spec.lr)
            session.module.train()
            for idx, new_epoch in batch_order(spec, len(x)):
                if new_epoch:
                    losses = []  # the reported loss is the last epoch's mean
                extras = kd_extras(
                    self.manifest, len(idx), *((teacher[idx], spec.kd_alpha, spec.kd_temperature) if kd else ())
                )
                losses.append(self._step(session, x[idx], y[idx], extras))
                steps += 1
                if on_step is not None:
                    on_step(steps, total, losses[-1])
        except ort_errors() as exc:
            raise TrainerError(f"training step failed: {exc}") from exc
        seconds = time.perf_counter() - started
        return TrainStats(loss=float(np.mean(losses)), steps=steps, samples=steps * batch, seconds=seconds)

    def evaluate(self, x: Inputs, y: np.ndarray, batch_size: int = 256) -> EvalStats:
        session = self._require_session()
        x, y = self._check_data(x, y)
        manifest = self.manifest
        total_loss, correct, size = 0.0, 0, max(1, batch_size)
        try:
            session.module.eval()
            for start in range(0, len(x), size):
                xb, yb = x[start : start + size], y[start : start + size]
                extras = kd_extras(manifest, len(xb))  # alpha 0: plain cross-entropy
                loss, logits = self._outputs(session.module(xb, yb, *extras.values()), manifest)
                total_loss += float(loss) * len(xb)
                correct += int(np.count_nonzero(np.argmax(logits, axis=1) == yb))
        except ort_errors() as exc:
            raise TrainerError(f"evaluation failed: {exc}") from exc
        finally:
            session.module.train()
        return EvalStats(loss=total_loss / len(x), accuracy=correct / len(x), samples=len(x))

    def teacher_logits(self, x: Inputs, y: np.ndarray, batch_size: int = TEACHER_BATCH) -> np.ndarray:
        """Logits [N, num_classes] of the current weights (eval graph: BatchNorm in inference mode), in
        batches of ``batch_size`` rows."""
        session = self._require_session()
        x, y = self._check_data(x, y)
        manifest = self.manifest

        def logits_of(xb: np.ndarray, yb: np.ndarray) -> np.ndarray:
            return self._outputs(session.module(xb, yb, *kd_extras(manifest, len(xb)).values()), manifest)[1]

        try:
            session.module.eval()
            return teacher_logits(logits_of, x, y, batch_size)
        except ort_errors() as exc:
            raise TrainerError(f"teacher pass failed: {exc}") from exc
        finally:
            session.module.train()

    # -- helpers ---------------------------------------------------------------------------------

    def _options(self) -> Any:
        import onnxruntime

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
        return float(loss), np.asarray(logits).reshape(len(logits), manifest.num_classes)

    def _step(self, session: _Session, xb: np.ndarray, yb: np.ndarray, extras: Mapping[str, np.ndarray]) -> float:
        loss, _ = self._outputs(session.module(xb, yb, *extras.values()), self.manifest)
        session.optimizer.step()
        session.module.lazy_reset_grad()
        return loss

    def _flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """Every manifest tensor, checked by name, shape and dtype, copied once into a float32 buffer in order."""
        checked = check_tensors(self.manifest, tensors, copy=False)
        flat = np.empty(sum(t.size for t in checked.values()), dtype=np.float32)
        offset = 0
        for t in checked.values():
            flat[offset : offset + t.size] = t.ravel()
            offset += t.size
        return flat

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
