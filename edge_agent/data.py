"""Local datasets and how they are split across nodes (numpy + stdlib only: runs on devices).

Datasets are read from local files, never downloaded:

- Fashion-MNIST: the gzipped IDX files of the Debian package ``dataset-fashion-mnist``;
- CIFAR-10: the standard python pickled batches (``data_batch_1..5``, ``test_batch``);
- NPZ, for users' own data: keys ``x_train, y_train, x_test, y_test``; x is uint8 or a float type
  (stored floats become float32) shaped [N, H, W] (grey) or [N, C, H, W]; y holds integer labels
  0..K-1; an optional scalar ``num_classes`` (default: largest label + 1).

Partitions: ``iid`` (random equal split), ``dirichlet:ALPHA`` (per-class label skew of Hsu et al.
2019: each class is spread over the parts by proportions drawn from Dirichlet(ALPHA)) and ``by-source``
(label l goes whole to part l mod parts: one novel per agent for token data sets, :mod:`edge_agent.textdata`).
"""

from __future__ import annotations

import codecs
import gzip
import logging
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from edge_agent.errors import EdgeAgentError
from edge_agent.exitcodes import ExitCode

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "SNAKE_FASHION_MNIST_DIR"
DATASET_SPECS = ("fashion-mnist", "fashion-mnist:/dir", "cifar10:/dir", "npz:/path/file.npz", "/path/file.npz")
_IDX_DTYPES = {0x08: np.dtype(np.uint8)}
_MAX_PARTITION_ATTEMPTS = 1000
_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array unpickling helper, whatever module holds it


class DataError(EdgeAgentError):
    """A dataset could not be read or split; the message says what to do."""

    exit_code: ClassVar[ExitCode] = ExitCode.DATA


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset: x is [N, C, H, W] (uint8 or float32), y is int64."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one sample."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


@dataclass(frozen=True)
class PartitionSpec:
    """How samples are split across nodes; ``alpha`` is set only for ``dirichlet``."""

    kind: Literal["iid", "dirichlet", "by-source"]
    alpha: float | None = None

    def __str__(self) -> str:
        return f"dirichlet:{self.alpha:g}" if self.kind == "dirichlet" else self.kind


# ---------------------------------------------------------------- Fashion-MNIST (IDX)


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc}); the file is truncated or corrupt") from exc
    if len(raw) < 4 + 4 * expected_ndim:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim != expected_ndim:
        raise DataError(f"{path}: bad IDX magic number {raw[:4].hex()} (expected 0000 08 {expected_ndim:02x})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = math.prod(dims)
    if len(raw) - offset != expected:
        raise DataError(f"{path}: header announces {dims} = {expected} values but the file holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=_IDX_DTYPES[dtype_code], offset=offset).reshape(dims)


def _fashion_split(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 3)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{root}: {prefix} has {images.shape[0]} images but {labels.shape[0]} labels")
    return images[:, None, :, :], labels.astype(np.int64)


def load_fashion_mnist(root: Path | None = None) -> Dataset:
    """Read Fashion-MNIST from ``root``, else ``$SNAKE_FASHION_MNIST_DIR``, else the Debian package's dir."""
    root = Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    try:
        x_train, y_train = _fashion_split(root, "train")
        x_test, y_test = _fashion_split(root, "t10k")
    except FileNotFoundError as exc:
        raise DataError(
            f"Fashion-MNIST not found: {exc.filename} is missing. Install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu/Raspberry Pi OS), or pass the directory "
            f"holding the four IDX .gz files (`fashion-mnist:/dir` or ${FASHION_MNIST_ENV}), or convert the data "
            "to the NPZ format (`npz:/path/file.npz`)."
        ) from exc
    return _checked(Dataset("fashion-mnist", x_train, y_train, x_test, y_test, 10), str(root))


# ---------------------------------------------------------------- NPZ


def _npz_x(key: str, value: np.ndarray) -> np.ndarray:
    if value.dtype != np.uint8 and not np.issubdtype(value.dtype, np.floating):
        raise DataError(f"NPZ key {key!r}: dtype {value.dtype} not supported (use uint8 or float32)")
    if value.ndim == 3:
        value = value[:, None, :, :]
    if value.ndim != 4:
        raise DataError(f"NPZ key {key!r}: shape {value.shape} must be [N, H, W] or [N, C, H, W]")
    return value if value.dtype == np.uint8 else value.astype(np.float32, copy=False)


def _npz_y(key: str, value: np.ndarray) -> np.ndarray:
    if not np.issubdtype(value.dtype, np.integer) or value.ndim != 1:
        raise DataError(f"NPZ key {key!r}: labels must be a 1-D integer array, got {value.dtype} {value.shape}")
    return value.astype(np.int64)


def load_npz(path: Path | str) -> Dataset:
    """Read a dataset in the NPZ format described in this module's docstring."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError as exc:
        raise DataError(f"NPZ dataset not found: {path}") from exc
    except (OSError, ValueError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable NPZ file ({exc})") from exc
    missing = [key for key in ("x_train", "y_train", "x_test", "y_test") if key not in arrays]
    if missing:
        raise DataError(f"{path}: NPZ is missing key(s) {missing}; present: {sorted(arrays)}")
    x_train, x_test = _npz_x("x_train", arrays["x_train"]), _npz_x("x_test", arrays["x_test"])
    y_train, y_test = _npz_y("y_train", arrays["y_train"]), _npz_y("y_test", arrays["y_test"])
    if "num_classes" in arrays:
        num_classes = int(arrays["num_classes"])
    else:
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return _checked(Dataset(path.stem, x_train, y_train, x_test, y_test, num_classes), str(path))


# ---------------------------------------------------------------- CIFAR-10 (python batches)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a batch file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles written by Python 3 spell bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
        norm = {(key.decode() if isinstance(key, bytes) else key): value for key, value in batch.items()}
        data = np.asarray(norm["data"], dtype=np.uint8)
        labels = np.asarray(norm["labels"], dtype=np.int64)
    except FileNotFoundError:
        raise
    except (OSError, EOFError, KeyError, AttributeError, ValueError, pickle.UnpicklingError) as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: data {data.shape} / labels {labels.shape} do not match [N, 3072] / [N]")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: Path | str) -> Dataset:
    """Read CIFAR-10 from the python batches in ``root`` (the ``cifar-10-batches-py`` directory)."""
    root = Path(root)
    try:
        train = [_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
        x_test, y_test = _cifar_batch(root / "test_batch")
    except FileNotFoundError as exc:
        raise DataError(
            f"CIFAR-10 not found: {exc.filename} is missing. Pass the directory holding the python batches "
            "(data_batch_1..5, test_batch) extracted from cifar-10-python.tar.gz, e.g. `cifar10:/data/cifar-10-batches-py`."
        ) from exc
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return _checked(Dataset("cifar10", x_train, y_train, x_test, y_test, 10), str(root))


# ---------------------------------------------------------------- entry point and helpers


def load_dataset(spec: str) -> Dataset:
    """Load a dataset from a spec: one of ``DATASET_SPECS``."""
    kind, sep, arg = spec.partition(":")
    if kind == "fashion-mnist":
        return load_fashion_mnist(Path(arg) if arg else None)
    if kind == "cifar10" and arg:
        return load_cifar10(Path(arg))
    if kind == "npz" and arg:
        return load_npz(Path(arg))
    if spec.endswith(".npz"):
        return load_npz(Path(spec))
    raise DataError(f"unknown dataset {spec!r}; accepted forms: {', '.join(DATASET_SPECS)}")


def _checked(ds: Dataset, source: str) -> Dataset:
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise DataError(f"{source}: train samples {ds.x_train.shape[1:]} differ from test {ds.x_test.shape[1:]}")
    for key, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{source}: x_{key} has {x.shape[0]} samples but y_{key} has {y.shape[0]} labels")
        if y.size and (int(y.min()) < 0 or int(y.max()) >= ds.num_classes):
            raise DataError(f"{source}: y_{key} labels span {y.min()}..{y.max()}, outside 0..{ds.num_classes - 1}")
    logger.info(
        "loaded %s from %s: %d train, %d test, %s, %d classes",
        ds.name,
        source,
        len(ds.y_train),
        len(ds.y_test),
        ds.input_shape,
        ds.num_classes,
    )
    return ds


class Images:
    """Images kept as stored (uint8 takes a quarter of float32's memory) and handed out as float32
    [n, C, H, W] in [0, 1] one batch at a time: ``images[idx]`` converts only those rows."""

    def __init__(self, stored: np.ndarray) -> None:
        if stored.ndim == 3:
            stored = stored[:, None, :, :]  # grey images gain their channel axis (a view)
        if stored.ndim != 4 or stored.dtype not in (np.uint8, np.float32):
            raise DataError(f"images must be uint8 or float32 [N, C, H, W], got {stored.dtype} {stored.shape}")
        self.stored = stored

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.stored.shape)

    @property
    def ndim(self) -> int:
        return 4

    @property
    def nbytes(self) -> int:
        return int(self.stored.nbytes)

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(to_float(self.stored[index]))


Inputs = np.ndarray | Images  # what trainers accept: float32 arrays, or images converted per batch


def to_float(x: np.ndarray) -> np.ndarray:
    """Return float32 [N, C, H, W] in [0, 1]: uint8 is divided by 255, floats pass through as float32."""
    if x.ndim == 3:
        x = x[:, None, :, :]
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    return x.astype(np.float32, copy=False)


def label_histogram(y: np.ndarray, num_classes: int) -> list[int]:
    """Count of each label 0..num_classes-1."""
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"labels span {y.min()}..{y.max()}, outside 0..{num_classes - 1}")
    return [int(count) for count in np.bincount(y.astype(np.int64), minlength=num_classes)]


def split_holdout(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Randomly hold out ``fraction`` of the samples for local validation: (x_tr, y_tr, x_val, y_val)."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"holdout fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = int(round(fraction * len(y)))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return x[train], y[train], x[val], y[val]


# ---------------------------------------------------------------- partitions


def parse_partition(text: str) -> PartitionSpec:
    """Parse ``iid``, ``by-source`` or ``dirichlet:ALPHA`` (ALPHA > 0)."""
    kind, _, arg = text.strip().partition(":")
    if kind in ("iid", "by-source") and not arg:
        return PartitionSpec(kind)  # type: ignore[arg-type]
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if math.isfinite(alpha) and alpha > 0:
            return PartitionSpec("dirichlet", alpha)
    raise DataError(
        f"bad partition {text!r}: use 'iid', 'by-source' or 'dirichlet:ALPHA' with ALPHA > 0 (e.g. dirichlet:0.5)"
    )


def partition(
    labels: np.ndarray, num_parts: int, spec: PartitionSpec, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Split sample indices into ``num_parts`` disjoint sorted int64 arrays covering every sample.

    Deterministic for a given seed. Dirichlet draws are repeated until every part holds at least
    ``min_size`` samples; a DataError says so if that does not happen within a bounded number of tries.
    """
    n = len(labels)
    if num_parts < 1 or num_parts * min_size > n:
        raise DataError(f"cannot split {n} samples into {num_parts} parts of at least {min_size}")
    rng = np.random.default_rng(seed)
    if spec.kind == "iid":
        return [np.sort(part).astype(np.int64) for part in np.array_split(rng.permutation(n), num_parts)]
    if spec.kind == "by-source":
        return _by_source(labels, num_parts)
    assert spec.alpha is not None
    for attempt in range(1, _MAX_PARTITION_ATTEMPTS + 1):
        parts = _dirichlet_once(labels, num_parts, spec.alpha, rng)
        if min(len(part) for part in parts) >= min_size:
            logger.debug("dirichlet:%g partition into %d parts took %d draw(s)", spec.alpha, num_parts, attempt)
            return parts
    raise DataError(
        f"dirichlet:{spec.alpha:g} left a part with fewer than {min_size} samples in {_MAX_PARTITION_ATTEMPTS} "
        f"draws ({n} samples, {num_parts} parts): raise alpha, lower min_size or use fewer parts"
    )


def _by_source(labels: np.ndarray, num_parts: int) -> list[np.ndarray]:
    """Label l (a source: a novel, a device) goes whole to part l mod ``num_parts``."""
    present = np.unique(labels)
    if len(present) < num_parts:
        raise DataError(f"by-source: {len(present)} sources cannot fill {num_parts} parts; use fewer parts or iid")
    owner = {int(label): i % num_parts for i, label in enumerate(present)}
    parts = np.array([owner[int(label)] for label in labels], dtype=np.int64)
    return [np.flatnonzero(parts == i).astype(np.int64) for i in range(num_parts)]


def _dirichlet_once(labels: np.ndarray, num_parts: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_parts, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
        for bucket, chunk in zip(buckets, np.split(idx, cuts), strict=True):
            bucket.append(chunk)
    return [np.sort(np.concatenate(bucket)).astype(np.int64) for bucket in buckets]
