"""Token data sets for language models, as agents hold them (numpy + stdlib only: runs on devices).

Agents never tokenize: the coordinator writes the tokens (:mod:`coordinator.text.sequences`). NPZ keys:

- ``x_train``, ``x_val``, ``x_test``: token ids [N, T + 1] (uint16 or another integer type); row i is
  a model input (its first T tokens) and that input's next-token targets (its last T);
- ``y_train``, ``y_val``, ``y_test``: int [N], the source (e.g. novel) of each sequence, 0..S-1;
- ``vocab_size``, ``pad_id``: integer scalars; targets equal to ``pad_id`` count for nothing;
- ``sources``: optional string array [S], the source names.

A file is a token data set when it holds ``vocab_size``. The sources play the part of an image data
set's classes for partitions (``iid``, ``dirichlet:A``, ``by-source``) and for the agent's hello.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.data import DataError
from edge_agent.protocol.manifest import IGNORE_INDEX

TOKEN_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "vocab_size", "pad_id")


@dataclass(frozen=True, eq=False)
class TokenDataset:
    """Token sequences [N, T + 1] and their sources [N], per split."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    vocab_size: int
    pad_id: int
    sources: tuple[str, ...]

    @property
    def seq_len(self) -> int:
        """Tokens per model input (T)."""
        return int(self.x_train.shape[1]) - 1

    @property
    def num_sources(self) -> int:
        return len(self.sources)


def npz_path(spec: str) -> Path | None:
    """The file of a dataset spec naming an NPZ (``npz:FILE``, ``tokens:FILE`` or ``FILE.npz``), else None."""
    kind, _, arg = spec.partition(":")
    if kind in ("npz", "tokens") and arg:
        return Path(arg)
    return Path(spec) if spec.endswith(".npz") else None


def is_token_npz(spec: str) -> bool:
    """Whether ``spec`` names an existing NPZ holding a token data set (it has ``vocab_size``)."""
    path = npz_path(spec)
    if path is None or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as npz:
            return "vocab_size" in npz.files
    except (OSError, ValueError, zlib.error):
        return False


def _check(name: str, ds: TokenDataset) -> TokenDataset:
    width = ds.x_train.shape[1] if ds.x_train.ndim == 2 else 0
    for split in ("train", "val", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        if x.ndim != 2 or x.shape[1] != width or width < 2 or not np.issubdtype(x.dtype, np.integer):
            raise DataError(f"{name}: x_{split} must be integer token ids [N, T + 1] alike, got {x.dtype} {x.shape}")
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{name}: y_{split} must be one integer source per sequence, got {y.dtype} {y.shape}")
        if x.size and (int(x.min()) < 0 or int(x.max()) >= ds.vocab_size):
            raise DataError(f"{name}: x_{split} token ids span {x.min()}..{x.max()}, outside 0..{ds.vocab_size - 1}")
        if y.size and (int(y.min()) < 0 or int(y.max()) >= ds.num_sources):
            raise DataError(f"{name}: y_{split} sources span {y.min()}..{y.max()}, outside 0..{ds.num_sources - 1}")
    return ds


def load_token_npz(path: Path | str) -> TokenDataset:
    """Read a token data set in the NPZ format of this module's docstring."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError as exc:
        raise DataError(f"token data set not found: {path}") from exc
    except (OSError, ValueError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable NPZ file ({exc})") from exc
    missing = [key for key in TOKEN_KEYS if key not in arrays]
    if missing:
        raise DataError(f"{path}: token NPZ is missing key(s) {missing}; present: {sorted(arrays)}")
    ys = [arrays[f"y_{s}"] for s in ("train", "val", "test")]
    count = int(max((int(y.max()) + 1 for y in ys if y.size), default=0))
    sources = tuple(map(str, arrays["sources"])) if "sources" in arrays else tuple(map(str, range(count)))
    ds = TokenDataset(
        path.stem,
        arrays["x_train"],
        ys[0].astype(np.int64),
        arrays["x_val"],
        ys[1].astype(np.int64),
        arrays["x_test"],
        ys[2].astype(np.int64),
        int(arrays["vocab_size"]),
        int(arrays["pad_id"]),
        sources,
    )
    return _check(str(path), ds)


def lm_pairs(sequences: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs int64 [N, T], next-token labels int64 [N, T]) of sequences [N, T + 1]; a <pad> target
    becomes IGNORE_INDEX (it counts for nothing in the loss)."""
    seqs = np.asarray(sequences, dtype=np.int64)
    labels = seqs[:, 1:].copy()
    labels[labels == pad_id] = IGNORE_INDEX
    return np.ascontiguousarray(seqs[:, :-1]), labels
