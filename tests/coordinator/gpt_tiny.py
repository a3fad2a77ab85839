"""The tiny GPT of the lowering and portable tests (2 blocks, width 32, T 16) and batches of tokens for it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.protocol.manifest import IGNORE_INDEX

if TYPE_CHECKING:
    from coordinator.export import ForwardModel

VOCAB, SEQ_LEN = 48, 16


def export_tiny_gpt(directory: Path) -> ForwardModel:
    """The tiny GPT built with seed 0, exported as a causal LM into ``directory``."""
    import torch

    from coordinator.export import TASK_CAUSAL_LM, export_forward
    from models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ_LEN, n_layer=2, n_head=2, n_embd=32))
    return export_forward(model, (SEQ_LEN,), VOCAB, directory, TASK_CAUSAL_LM)


def token_batch(forward: ForwardModel, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids [rows, T] and their next-token labels; the first row ends in padding (ignored)."""
    seq_len = forward.input_shape[0]
    tokens = np.random.default_rng(seed).integers(0, forward.num_classes, (rows, seq_len + 1)).astype(np.int64)
    labels = tokens[:, 1:].copy()
    labels[0, -3:] = IGNORE_INDEX
    return np.ascontiguousarray(tokens[:, :-1]), labels
