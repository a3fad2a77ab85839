"""Partitions written as NPZ files read back as they were written (coordinator.partitions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coordinator.partitions import save_npz
from edge_agent.data import load_dataset
from tests.edge_agent.test_data import tiny_dataset


def test_npz_round_trip_keeps_dtypes(tmp_path: Path) -> None:
    ds = tiny_dataset(num_classes=5)
    save_npz(tmp_path / "d.npz", ds)
    back = load_dataset(str(tmp_path / "d.npz"))
    assert back.x_train.dtype == np.uint8 and back.num_classes == 5
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(back, key), getattr(ds, key))
    assert load_dataset(f"npz:{tmp_path / 'd.npz'}").input_shape == (1, 4, 4)
