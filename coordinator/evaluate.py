"""The end of a trial: assemble the model, export the deployable ONNX, evaluate it on the test set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from coordinator.export import export_inference


@dataclass(frozen=True)
class TestResult:
    accuracy: float
    loss: float
    samples: int


def finalize(model: nn.Module, tensors: Mapping[str, np.ndarray], input_shape: tuple[int, ...], path: Path) -> Path:
    """Write ``final_model.onnx`` (inference, dynamic batch) from the assembled tensors."""
    return export_inference(model, input_shape, path, tensors)


def evaluate_onnx(path: Path, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> TestResult:
    """Accuracy and mean cross-entropy of an inference ONNX, run by onnxruntime.InferenceSession."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct, loss_sum = 0, 0.0
    for lo in range(0, len(y), batch_size):
        logits = session.run(None, {name: x[lo : lo + batch_size]})[0].astype(np.float64)  # [B, K]
        labels = y[lo : lo + batch_size]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss_sum += float(-log_probs[np.arange(len(labels)), labels].sum())
        correct += int((logits.argmax(axis=1) == labels).sum())
    return TestResult(correct / len(y), loss_sum / len(y), len(y))
