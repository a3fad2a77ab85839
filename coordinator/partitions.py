"""The agents' shares of a data set, written as NPZ files (the format agents read, :func:`edge_agent.data.load_npz`).

Torch-free: ``simulate`` and the benchmarks give each agent process its partition this way.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from coordinator.config import TrialConfig
from coordinator.text.sequences import save_tokens_npz
from edge_agent.data import Dataset, label_histogram, parse_partition, partition, split_holdout
from edge_agent.textdata import TokenDataset


def save_npz(path: Path | str, ds: Dataset) -> None:
    """Write ``ds`` in the NPZ format (uncompressed; dtypes kept)."""
    np.savez(
        Path(path),
        x_train=ds.x_train,
        y_train=ds.y_train,
        x_test=ds.x_test,
        y_test=ds.y_test,
        num_classes=np.int64(ds.num_classes),
    )


def shares(config: TrialConfig, labels: np.ndarray) -> list[np.ndarray]:
    """Each agent's training indices: the trial's partition of ``labels``, capped at ``samples_per_agent``."""
    parts = partition(labels, config.agents, parse_partition(config.partition), seed=config.seed)
    rng = np.random.default_rng(config.seed)
    out = []
    for idx in parts:
        if config.samples_per_agent and len(idx) > config.samples_per_agent:
            idx = np.sort(rng.permutation(idx)[: config.samples_per_agent])
        out.append(idx)
    return out


def label_histograms(config: TrialConfig, ds: Dataset) -> dict[str, list[int]]:
    """The training label histogram each simulated agent of ``config`` will report in its hello."""
    out = {}
    for i, idx in enumerate(shares(config, ds.y_train)):
        y, _, _, _ = split_holdout(ds.y_train[idx], ds.y_train[idx], config.val_fraction, seed=config.seed + i)
        out[f"agent-{i}"] = label_histogram(y, ds.num_classes)
    return out


def write_partitions(config: TrialConfig, ds: Dataset, root: Path) -> list[Path]:
    """One NPZ per agent: its share of the training set (capped) and a local validation split."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, idx in enumerate(shares(config, ds.y_train)):
        x, y, xv, yv = split_holdout(ds.x_train[idx], ds.y_train[idx], config.val_fraction, seed=config.seed + i)
        path = root / f"agent-{i}.npz"
        save_npz(path, Dataset(f"{ds.name}[agent-{i}]", x, y, xv, yv, ds.num_classes))
        paths.append(path)
    return paths


def write_token_partitions(config: TrialConfig, ds: TokenDataset, root: Path) -> list[Path]:
    """One token NPZ per agent: its share of the training sequences (capped) and the same partition of the
    validation sequences (``by-source``: an agent validates on its own novels), capped at
    :func:`validation_cap`; the test set stays here."""
    root.mkdir(parents=True, exist_ok=True)
    spec = parse_partition(config.partition)
    train_parts = partition(ds.y_train, config.agents, spec, seed=config.seed, min_size=1)
    val_parts = partition(ds.y_val, config.agents, spec, seed=config.seed, min_size=1)
    rng = np.random.default_rng(config.seed)
    paths = []
    for i, (idx, val) in enumerate(zip(train_parts, val_parts, strict=True)):
        if config.samples_per_agent and len(idx) > config.samples_per_agent:
            idx = np.sort(rng.permutation(idx)[: config.samples_per_agent])
        cap = validation_cap(config, len(idx))
        if len(val) > cap:  # every hop validates its whole share: keep it in proportion to what a hop trains
            val = np.sort(rng.permutation(val)[:cap])
        empty = ds.x_test[:0], ds.y_test[:0]
        share = TokenDataset(f"{ds.name}[agent-{i}]", ds.x_train[idx], ds.y_train[idx], ds.x_val[val], ds.y_val[val],
                             *empty, ds.vocab_size, ds.pad_id, ds.sources)  # fmt: skip
        path = root / f"agent-{i}.npz"
        save_tokens_npz(path, share)
        paths.append(path)
    return paths


def validation_cap(config: TrialConfig, train_sequences: int) -> int:
    """Validation sequences an agent keeps: ``val_fraction`` of what one hop trains on (its share times the
    epochs, or ``max_steps`` batches), relative to training, and at least one batch."""
    t = config.train
    used = train_sequences * t.epochs
    if t.max_steps:
        used = min(used, t.max_steps * t.batch_size)
    return max(t.batch_size, math.ceil(used * config.val_fraction / (1 - config.val_fraction)))
