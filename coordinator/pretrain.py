"""A language model's base: pretrained in torch on part of the corpus, cached by a content hash.

The key hashes every setting that shapes the result (model, vocabulary, sequence length, steps, batch
size, learning rate, seed) and the pretraining tokens themselves, so a changed corpus split or setting
trains a new base and an unchanged one is read back (``<cache>/pretrain/<key>.safetensors``, with the
settings and final loss beside it in ``<key>.json``). Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from coordinator.errors import ConfigError

log = logging.getLogger(__name__)
CACHE_ENV = "SNAKE_CACHE_DIR"
Progress = Callable[[int, int, float], None]  # (step, steps, loss so far)


@dataclass(frozen=True)
class PretrainSettings:
    model: str
    vocab_size: int
    seq_len: int
    steps: int
    batch_size: int
    lr: float
    seed: int


def cache_root(configured: str = "") -> Path:
    """``configured``, else ``$SNAKE_CACHE_DIR``, else ``~/.cache/snakelearn``."""
    return Path(configured or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "snakelearn").expanduser()


def pretrain_key(settings: PretrainSettings, sequences: np.ndarray) -> str:
    """The cache key: sha256 of the settings (JSON, sorted) and the pretraining tokens."""
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    tokens = np.ascontiguousarray(sequences, dtype=np.uint16)
    digest.update(str(tokens.shape).encode())
    digest.update(tokens.tobytes())
    return digest.hexdigest()[:24]


def save_state(path: Path, tensors: Mapping[str, np.ndarray], meta: Mapping[str, object] | None = None) -> Path:
    """Write ``tensors`` as safetensors (float32), atomically."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    if meta is not None:
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return path


def load_state(path: Path) -> dict[str, np.ndarray]:
    """A state dict written by :func:`save_state` (or any safetensors file of the model's tensors)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except FileNotFoundError as exc:
        raise ConfigError(f"base model {path} does not exist") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"base model {path} is not a readable safetensors file: {exc}") from exc


def train_lm(
    settings: PretrainSettings, sequences: np.ndarray, pad_id: int, progress: Progress | None = None
) -> tuple[dict[str, np.ndarray], float]:
    """Train a fresh model (seeded) for ``settings.steps`` AdamW steps on random batches of ``sequences``
    [N, T + 1]; returns its tensors and the mean loss of the last tenth of the steps."""
    import torch
    import torch.nn.functional as F

    from coordinator.export import model_tensors
    from edge_agent.protocol.manifest import IGNORE_INDEX
    from models import InputSpec, build_model

    torch.manual_seed(settings.seed)
    model = build_model(settings.model, InputSpec(num_classes=settings.vocab_size, seq_len=settings.seq_len))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    rng = np.random.default_rng(settings.seed)
    seqs = torch.from_numpy(np.asarray(sequences, dtype=np.int64))
    losses: list[float] = []
    for step in range(settings.steps):
        batch = seqs[torch.from_numpy(rng.integers(0, len(seqs), settings.batch_size))]
        x, y = batch[:, :-1], batch[:, 1:].clone()
        y[y == pad_id] = IGNORE_INDEX
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, settings.steps, losses[-1])
    tail = losses[-max(1, len(losses) // 10) :]
    return model_tensors(model), float(np.mean(tail)) if tail else math.nan


def cached_base(
    settings: PretrainSettings, sequences: np.ndarray, pad_id: int, cache: Path, progress: Progress | None = None
) -> tuple[dict[str, np.ndarray], Path, bool]:
    """The pretrained base for ``settings`` on ``sequences``: (tensors, its file, whether it was cached)."""
    path = cache / "pretrain" / f"{pretrain_key(settings, sequences)}.safetensors"
    if path.is_file():
        log.info("base model from the cache: %s", path)
        return load_state(path), path, True
    log.info("pretraining the base model: %d steps on %d sequences -> %s", settings.steps, len(sequences), path)
    started = time.monotonic()
    tensors, loss = train_lm(settings, sequences, pad_id, progress)
    meta = asdict(settings) | {"sequences": len(sequences), "final_loss": round(loss, 4),
                               "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    save_state(path, tensors, meta)
    log.info("base model pretrained in %.0f s (loss %.3f)", meta["seconds"], loss)
    return tensors, path, False
