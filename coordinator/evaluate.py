"""The end of a trial: assemble the model, export the deployable ONNX, evaluate it on the test set.

Classifiers: accuracy and mean cross-entropy per sample. Language models (int64 token ids [N, T] in,
logits [N, T, V] out): mean next-token cross-entropy per counted token (labels equal to IGNORE_INDEX
count for nothing), token accuracy, and perplexity = exp(mean loss).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from coordinator.export import TASK_CLASSIFY, export_inference
from coordinator.lora import has_adapters, merged_model
from edge_agent.protocol.manifest import IGNORE_INDEX


@dataclass(frozen=True)
class TestResult:
    accuracy: float  # per sample (classifier) or per counted token (language model)
    loss: float  # mean cross-entropy, same unit
    samples: int

    @property
    def perplexity(self) -> float:
        """exp(mean loss): for a language model, the effective number of choices per token."""
        return math.exp(self.loss) if self.loss < 700 else math.inf


def finalize(
    model: nn.Module,
    tensors: Mapping[str, np.ndarray],
    input_shape: tuple[int, ...],
    path: Path,
    task: str = TASK_CLASSIFY,
) -> Path:
    """Write ``final_model.onnx`` (inference, dynamic batch) from the assembled tensors. A LoRA model is
    exported merged: adapters folded into the base weights, the graph as without LoRA."""
    if has_adapters(model):
        return export_inference(merged_model(model, tensors), input_shape, path, None, task)
    return export_inference(model, input_shape, path, tensors, task)


def _session(path: Path) -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def token_loss(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int, int]:
    """(summed cross-entropy, counted tokens, correct tokens) of logits [..., V] against labels [...]
    (IGNORE_INDEX: not counted)."""
    flat = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    targets = labels.reshape(-1)
    keep = targets != IGNORE_INDEX
    flat, targets = flat[keep], targets[keep]
    shifted = flat - flat.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(targets)), targets].sum())
    return loss, len(targets), int((flat.argmax(axis=1) == targets).sum())


def evaluate_lm_onnx(path: Path, tokens: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> TestResult:
    """Token accuracy and mean next-token cross-entropy of a language model's inference ONNX
    (``tokens`` int64 [N, T], ``labels`` int64 [N, T]); ``perplexity`` follows."""
    session = _session(path)
    name = session.get_inputs()[0].name  # type: ignore[attr-defined]
    loss_sum, counted, correct = 0.0, 0, 0
    for lo in range(0, len(tokens), batch_size):
        batch = np.ascontiguousarray(tokens[lo : lo + batch_size], dtype=np.int64)
        logits = session.run(None, {name: batch})[0]  # type: ignore[attr-defined]  # [B, T, V]
        part_loss, part_count, part_correct = token_loss(logits, labels[lo : lo + batch_size])
        loss_sum, counted, correct = loss_sum + part_loss, counted + part_count, correct + part_correct
    counted = max(counted, 1)
    return TestResult(correct / counted, loss_sum / counted, len(tokens))


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
