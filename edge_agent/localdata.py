"""An agent's local data: loaded once, partitioned by seed, capped, split for validation."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edge_agent.config import AgentConfig
from edge_agent.data import (
    DataError,
    Images,
    label_histogram,
    load_dataset,
    parse_partition,
    partition,
    split_holdout,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LocalData:
    x_train: Images  # [N, C, H, W], as stored (uint8 or float32); float32 in [0, 1] per batch
    y_train: np.ndarray  # int64 [N]
    x_val: Images
    y_val: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> list[int]:
        return [int(d) for d in self.x_train.shape[1:]]

    def histogram(self) -> list[int]:
        return label_histogram(self.y_train, self.num_classes)


def load_local(config: AgentConfig) -> LocalData:
    """With a partition: this agent's share of the training set, minus a validation split.
    Without: the data set's own train/test split (an NPZ made for this agent)."""
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
