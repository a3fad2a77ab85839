"""Datasets and partitions, on the real Fashion-MNIST files."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.data import (
    FASHION_MNIST_DIR,
    DataError,
    Dataset,
    PartitionSpec,
    label_histogram,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_npz,
    parse_partition,
    partition,
    split_holdout,
    to_float,
)

needs_fashion = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); CI installs it",
)


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); CI installs it")
    return load_fashion_mnist()


def tiny_dataset(num_classes: int = 3) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(
        "tiny",
        rng.integers(0, 256, (12, 1, 4, 4), dtype=np.uint8),
        np.arange(12, dtype=np.int64) % num_classes,
        rng.integers(0, 256, (6, 1, 4, 4), dtype=np.uint8),
        np.arange(6, dtype=np.int64) % num_classes,
        num_classes,
    )


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_is_complete(fashion: Dataset) -> None:
    assert fashion.x_train.shape == (60000, 1, 28, 28) and fashion.x_test.shape == (10000, 1, 28, 28)
    assert fashion.x_train.dtype == np.uint8 and fashion.y_train.dtype == np.int64
    assert fashion.input_shape == (1, 28, 28) and fashion.num_classes == 10
    assert fashion.y_train.min() == 0 and fashion.y_train.max() == 9
    assert label_histogram(fashion.y_train, 10) == [6000] * 10
    assert sum(label_histogram(fashion.y_test, 10)) == 10000
    assert 0 < fashion.x_train.mean() < 255  # real images, not zeros


def test_to_float_scales_to_unit_range(fashion: Dataset) -> None:
    x = to_float(fashion.x_test[:100])
    assert x.dtype == np.float32 and x.shape == (100, 1, 28, 28)
    assert x.min() >= 0.0 and x.max() == pytest.approx(1.0)
    floats = np.full((2, 3, 3), 0.5, dtype=np.float64)
    assert to_float(floats).dtype == np.float32 and to_float(floats).shape == (2, 1, 3, 3)


@needs_fashion
def test_dataset_specs_and_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert load_dataset(f"fashion-mnist:{FASHION_MNIST_DIR}").x_test.shape[0] == 10000
    monkeypatch.setenv("SNAKE_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_missing_dir_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_fashion_mnist(tmp_path / "nowhere")
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "npz" in message.lower()


@needs_fashion
def test_truncated_idx_file_is_a_clear_error(tmp_path: Path) -> None:
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes((FASHION_MNIST_DIR / name).read_bytes())
    raw = gzip.decompress((FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:-5]))
    images = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(images[: len(images) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_fashion_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(images)
    with pytest.raises(DataError, match="header announces"):
        load_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + raw[4:]))
    with pytest.raises(DataError, match="magic"):
        load_fashion_mnist(tmp_path)


def test_unknown_spec_lists_accepted_forms() -> None:
    with pytest.raises(DataError, match=r"fashion-mnist.*cifar10:/dir.*npz:"):
        load_dataset("imagenet")


# ---------------------------------------------------------------- NPZ and CIFAR-10


def test_npz_grey_images_gain_a_channel_and_classes_default(tmp_path: Path) -> None:
    y = np.array([0, 1, 2, 1])
    np.savez(
        tmp_path / "g.npz",
        x_train=np.zeros((4, 5, 6), np.float32),
        y_train=y,
        x_test=np.zeros((4, 5, 6), np.float32),
        y_test=y,
    )
    ds = load_npz(tmp_path / "g.npz")
    assert ds.input_shape == (1, 5, 6) and ds.num_classes == 3 and ds.x_train.dtype == np.float32


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x_train": np.zeros((2, 3, 3), np.int32)}, r"'x_train'.*int32"),
        ({"y_test": np.zeros(2, np.float32)}, r"'y_test'.*integer"),
        ({"x_test": np.zeros((2, 3), np.uint8)}, r"'x_test'.*shape"),
        ({"y_train": np.array([0, 7]), "num_classes": np.int64(3)}, r"y_train.*outside 0..2"),
        ({"y_test": np.array([0, -1])}, r"y_test.*outside"),
        ({"y_test": np.zeros(3, np.int64)}, r"x_test has 2 samples but y_test has 3"),
    ],
)
def test_bad_npz_names_the_key(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    good: dict[str, Any] = {
        "x_train": np.zeros((2, 3, 3), np.uint8),
        "y_train": np.array([0, 1]),
        "x_test": np.zeros((2, 3, 3), np.uint8),
        "y_test": np.array([1, 0]),
    }
    np.savez(tmp_path / "bad.npz", **(good | arrays))
    with pytest.raises(DataError, match=match):
        load_npz(tmp_path / "bad.npz")
    del good["x_test"], good["y_test"]
    np.savez(tmp_path / "half.npz", **good)
    with pytest.raises(DataError, match=r"missing key.*x_test"):
        load_npz(tmp_path / "half.npz")


def test_npz_missing_or_not_npz(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable NPZ"):
        load_npz(tmp_path / "junk.npz")


def _write_cifar_batch(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = {  # the layout of the official python batches (keys are bytes after a py2 unpickle)
        b"batch_label": b"fake batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_python_batches(tmp_path: Path) -> None:
    for i in range(1, 6):
        _write_cifar_batch(tmp_path / f"data_batch_{i}", 4, seed=i)
    _write_cifar_batch(tmp_path / "test_batch", 3, seed=9)
    ds = load_dataset(f"cifar10:{tmp_path}")
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64 and ds.num_classes == 10
    first = pickle.loads((tmp_path / "data_batch_1").read_bytes())
    np.testing.assert_array_equal(ds.x_train[0].reshape(-1), first[b"data"][0])  # channel-major rows


def test_cifar10_missing_and_hostile_batches(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data_batch_1"):
        load_cifar10(tmp_path)
    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(print))  # would call code if trusted
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------- partitions


def test_parse_partition() -> None:
    assert parse_partition("iid") == PartitionSpec("iid")
    assert parse_partition("dirichlet:0.5") == PartitionSpec("dirichlet", 0.5)
    assert str(parse_partition("dirichlet:0.1")) == "dirichlet:0.1"
    for bad in ("", "iid:3", "dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:abc", "dirichlet:nan", "zipf"):
        with pytest.raises(DataError, match="iid.*dirichlet:ALPHA"):
            parse_partition(bad)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3"])
def test_partition_is_disjoint_covering_and_deterministic(fashion: Dataset, spec: str) -> None:
    parts = partition(fashion.y_train, 8, parse_partition(spec), seed=3)
    joined = np.concatenate(parts)
    assert len(parts) == 8 and min(len(p) for p in parts) >= 10
    assert len(joined) == len(np.unique(joined)) == 60000  # disjoint and covering
    again = partition(fashion.y_train, 8, parse_partition(spec), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(fashion.y_train, 8, parse_partition(spec), seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def _mean_skew(y: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each part's label mix and the global one (0 = IID)."""
    glob = np.bincount(y, minlength=10) / len(y)
    return float(np.mean([0.5 * np.abs(np.bincount(y[p], minlength=10) / len(p) - glob).sum() for p in parts]))


def test_dirichlet_skew_grows_as_alpha_shrinks(fashion: Dataset) -> None:
    y = fashion.y_train
    skew = {a: _mean_skew(y, partition(y, 10, PartitionSpec("dirichlet", a), seed=0)) for a in (0.1, 100.0)}
    iid = _mean_skew(y, partition(y, 10, PartitionSpec("iid"), seed=0))
    assert skew[0.1] > 0.5 and skew[100.0] < 0.1 and iid < 0.05
    assert sum(len(p) for p in partition(y, 10, PartitionSpec("dirichlet", 0.1), seed=0)) == 60000


def test_partition_gives_up_with_a_clear_error() -> None:
    y = np.repeat(np.arange(10), 5)
    with pytest.raises(DataError, match="fewer than 10 samples"):
        partition(y, 5, PartitionSpec("dirichlet", 0.01), seed=0, min_size=10)
    with pytest.raises(DataError, match="cannot split 50 samples into 6 parts"):
        partition(y, 6, PartitionSpec("iid"), seed=0)


def test_label_histogram_and_holdout(fashion: Dataset) -> None:
    x, y = fashion.x_test, fashion.y_test
    x_tr, y_tr, x_val, y_val = split_holdout(x, y, 0.1, seed=1)
    assert len(y_val) == 1000 and len(y_tr) == 9000 and x_val.shape == (1000, 1, 28, 28)
    assert np.add(label_histogram(y_tr, 10), label_histogram(y_val, 10)).tolist() == label_histogram(y, 10)
    np.testing.assert_array_equal(split_holdout(x, y, 0.1, seed=1)[3], y_val)
    with pytest.raises(DataError):
        split_holdout(x, y, 1.0, seed=1)
    with pytest.raises(DataError, match="outside 0..4"):
        label_histogram(np.array([0, 5]), 5)


def test_an_agent_keeps_its_images_as_stored_and_converts_one_batch_at_a_time() -> None:
    from edge_agent.config import AgentConfig
    from edge_agent.localdata import load_local

    config = AgentConfig("a0", "mqtt://127.0.0.1:1", "fashion-mnist", partition="iid", part=(0, 4), samples=500)
    data = load_local(config)
    assert data.x_train.shape == (500, 1, 28, 28) and data.input_shape == [1, 28, 28]
    assert data.x_train.nbytes == 500 * 28 * 28  # uint8: a quarter of float32 (47 MB -> 12 MB for 15,000 images)
    rows = np.array([3, 1, 2])
    batch = data.x_train[rows]
    assert batch.dtype == np.float32 and batch.shape == (3, 1, 28, 28) and batch.flags.c_contiguous
    np.testing.assert_array_equal(batch, to_float(data.x_train.stored[rows]))
    assert 0.0 <= batch.min() and batch.max() <= 1.0 and batch.max() > 0.5
