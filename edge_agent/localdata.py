"""An agent's local data: loaded once, partitioned by seed, capped, split for validation.

Images with class labels, or (a token NPZ, :mod:`edge_agent.textdata`) a language model's token
sequences: inputs int64 [N, T], next-token labels int64 [N, T], plus each sequence's source. Then
``num_classes`` is the vocabulary size and the histogram counts sequences per source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edge_agent.config import AgentConfig
from edge_agent.data import (
    DataError,
    Images,
    Inputs,
    label_histogram,
    load_dataset,
    parse_partition,
    partition,
    split_holdout,
)
from edge_agent.textdata import is_token_npz, lm_pairs, load_token_npz, npz_path

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LocalData:
    x_train: Inputs  # images [N, C, H, W] as stored (float32 in [0, 1] per batch), or token ids int64 [N, T]
    y_train: np.ndarray  # int64 [N] classes, or int64 [N, T] next-token ids (IGNORE_INDEX: no target)
    x_val: Inputs
    y_val: np.ndarray
    num_classes: int  # classes, or the vocabulary size
    sources: np.ndarray | None = None  # token data: int64 [N] source of each training sequence
    num_sources: int = 0

    @property
    def input_shape(self) -> list[int]:
        return [int(d) for d in self.x_train.shape[1:]]

    def histogram(self) -> list[int]:
        """Training samples per class; for token data, sequences per source."""
        if self.sources is not None:
            return label_histogram(self.sources, self.num_sources)
        return label_histogram(self.y_train, self.num_classes)


def load_local(config: AgentConfig) -> LocalData:
    """With a partition: this agent's share of the training set, minus a validation split.
    Without: the data set's own train/test split (an NPZ made for this agent)."""
    if is_token_npz(config.data):
        return load_local_tokens(config)
    ds = load_dataset(config.data)
    x, y = ds.x_train, ds.y_train
    if config.partition is not None:
        index, count = config.part
        if not 0 <= index < count:
            raise DataError(f"partition index {index} is outside 0..{count - 1}")
        parts = partition(y, count, parse_partition(config.partition), seed=config.seed)
        x, y = x[parts[index]], y[parts[index]]
        x, y, x_val, y_val = split_holdout(x, y, config.val_fraction, seed=config.seed)
    else:
        x_val, y_val = ds.x_test, ds.y_test
    if config.samples and len(y) > config.samples:
        keep = np.random.default_rng(config.seed).permutation(len(y))[: config.samples]
        x, y = x[keep], y[keep]
    if len(y) < 2:
        raise DataError(f"agent {config.agent_id} has {len(y)} training samples; it needs at least 2")
    log.info("local data: %d train, %d validation samples from %s", len(y), len(y_val), ds.name)
    return LocalData(Images(x), y.astype(np.int64), Images(x_val), y_val.astype(np.int64), ds.num_classes)


def _share(labels: np.ndarray, config: AgentConfig) -> np.ndarray:
    """Indices of this agent's partition of ``labels`` (all of them without a partition)."""
    if config.partition is None:
        return np.arange(len(labels))
    index, count = config.part
    if not 0 <= index < count:
        raise DataError(f"partition index {index} is outside 0..{count - 1}")
    return partition(labels, count, parse_partition(config.partition), seed=config.seed, min_size=1)[index]


def load_local_tokens(config: AgentConfig) -> LocalData:
    """A token data set: this agent's share of the training and validation sequences (same partition
    applied to both, so ``by-source`` keeps an agent's novels in its validation too), capped."""
    path = npz_path(config.data)
    assert path is not None  # is_token_npz said so
    ds = load_token_npz(path)
    train, val = _share(ds.y_train, config), _share(ds.y_val, config)
    if config.samples and len(train) > config.samples:
        train = np.sort(np.random.default_rng(config.seed).permutation(train)[: config.samples])
    if len(train) < 2:
        raise DataError(f"agent {config.agent_id} has {len(train)} training sequences; it needs at least 2")
    x, y = lm_pairs(ds.x_train[train], ds.pad_id)
    x_val, y_val = lm_pairs(ds.x_val[val], ds.pad_id)
    log.info("local data: %d train, %d validation sequences of %d tokens from %s", len(x), len(x_val), ds.seq_len,
             ds.name)  # fmt: skip
    return LocalData(x, y, x_val, y_val, ds.vocab_size, ds.y_train[train], ds.num_sources)
