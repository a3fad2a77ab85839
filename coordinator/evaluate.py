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
from typing import Any

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


LOGITS_BYTES = 64 << 20  # float32 logits one evaluation batch of a language model may produce (OPT's 50,272-token
#                          vocabulary: 5 sequences of 64 tokens, where a fixed 64 sequences took 824 MB plus copies)


def token_loss(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int, int]:
    """(summed cross-entropy, counted tokens, correct tokens) of logits [..., V] against labels [...]
    (IGNORE_INDEX: not counted). One float32 temporary the size of the counted logits; sums in float64."""
    targets = labels.reshape(-1)
    keep = targets != IGNORE_INDEX
    flat, targets = logits.reshape(-1, logits.shape[-1])[keep], targets[keep]
    top = flat.max(axis=1)
    shifted = np.subtract(flat, top[:, None], dtype=np.float32)
    np.exp(shifted, out=shifted)
    log_norm = np.log(shifted.sum(axis=1, dtype=np.float64)) + top
    picked = flat[np.arange(len(targets)), targets].astype(np.float64)
    loss = float((log_norm - picked).sum())
    return loss, len(targets), int((flat.argmax(axis=1) == targets).sum())


def lm_batch_size(session: Any, seq_len: int, cap: int = 64) -> int:
    """Sequences per evaluation batch: at most ``cap``, and logits within :data:`LOGITS_BYTES`."""
    vocab = session.get_outputs()[0].shape[-1]
    if not isinstance(vocab, int) or vocab <= 0:
        return cap
    return max(1, min(cap, LOGITS_BYTES // (4 * max(seq_len, 1) * vocab)))


def evaluate_lm_onnx(path: Path, tokens: np.ndarray, labels: np.ndarray, batch_size: int | None = None) -> TestResult:
    """Token accuracy and mean next-token cross-entropy of a language model's inference ONNX
    (``tokens`` int64 [N, T], ``labels`` int64 [N, T]); ``perplexity`` follows. ``batch_size``: sequences per
    run (default: :func:`lm_batch_size`)."""
    session = _session(path)
    name = session.get_inputs()[0].name  # type: ignore[attr-defined]
    batch_size = batch_size or lm_batch_size(session, tokens.shape[1] if tokens.ndim == 2 else 1)
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
