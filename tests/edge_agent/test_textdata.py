"""Token data sets as agents hold them: the NPZ format, by-source partitions, local data and its hello fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import AgentConfig
from edge_agent.data import DataError, parse_partition, partition
from edge_agent.localdata import load_local
from edge_agent.protocol.manifest import IGNORE_INDEX
from edge_agent.textdata import TokenDataset, is_token_npz, lm_pairs, load_token_npz

VOCAB, PAD, T = 20, 19, 5


def _write(path: Path, sources: int = 3, rows: int = 12) -> Path:
    """A small token NPZ: ``rows`` train and 4 val/test sequences per source, source s counting up from s."""

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(sources), n)
        x = (y[:, None] + np.arange(T + 1)) % PAD
        return x.astype(np.uint16), y

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = split(rows), split(4), split(4)
    x_tr[0, -2:] = PAD  # a padded last window
    names = np.array([f"novel {s}" for s in range(sources)])
    np.savez(path, x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va, x_test=x_te, y_test=y_te,
             vocab_size=np.int64(VOCAB), pad_id=np.int64(PAD), sources=names)  # fmt: skip
    return path


def test_token_npz_loads_and_is_told_apart_from_images(tmp_path: Path) -> None:
    path = _write(tmp_path / "austen.npz")
    assert is_token_npz(f"npz:{path}") and is_token_npz(str(path))
    np.savez(tmp_path / "images.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2, np.int64))
    assert not is_token_npz(str(tmp_path / "images.npz")) and not is_token_npz("fashion-mnist")
    ds = load_token_npz(path)
    assert isinstance(ds, TokenDataset) and ds.seq_len == T and ds.vocab_size == VOCAB
    assert ds.sources == ("novel 0", "novel 1", "novel 2") and ds.num_sources == 3


def test_bad_token_npz_is_refused_with_a_reason(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.npz")
    arrays = dict(np.load(path))
    arrays["x_val"] = arrays["x_val"] + VOCAB  # ids past the vocabulary
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="x_val token ids"):
        load_token_npz(path)


def test_lm_pairs_shift_by_one_and_ignore_padding() -> None:
    seqs = np.array([[1, 2, 3, PAD], [4, 5, 6, 7]], np.uint16)
    x, y = lm_pairs(seqs, PAD)
    assert x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(y, [[2, 3, IGNORE_INDEX], [5, 6, 7]])


def test_by_source_gives_each_part_whole_sources() -> None:
    labels = np.repeat(np.arange(6), 5)
    assert str(parse_partition("by-source")) == "by-source"
    parts = partition(labels, 4, parse_partition("by-source"), seed=0, min_size=1)
    owned = [sorted(set(labels[p].tolist())) for p in parts]
    assert owned == [[0, 4], [1, 5], [2], [3]]
    assert sorted(np.concatenate(parts).tolist()) == list(range(30))
    with pytest.raises(DataError, match="6 sources cannot fill 7 parts"):
        partition(labels, 7, parse_partition("by-source"), seed=0, min_size=1)


def test_agent_holds_its_novel_as_token_pairs(tmp_path: Path) -> None:
    path = _write(tmp_path / "austen.npz")
    config = AgentConfig("a1", "mqtt://x", f"npz:{path}", partition="by-source", part=(1, 3))
    data = load_local(config)
    assert data.input_shape == [T] and data.num_classes == VOCAB
    assert data.x_train.dtype == np.int64 and data.y_train.shape == (12, T)
    np.testing.assert_array_equal(data.y_train[:, :-1], data.x_train[:, 1:])  # labels: the next tokens
    assert data.histogram() == [0, 12, 0]  # sequences per source: only novel 1
    assert data.y_val.shape == (4, T) and set(data.x_val[:, 0].tolist()) == {1}  # validation from its own novel
    whole = load_local(AgentConfig("a0", "mqtt://x", str(path)))
    assert whole.histogram() == [12, 12, 12] and int(np.count_nonzero(whole.y_train == IGNORE_INDEX)) == 2
