"""Text for language models: byte tokenizer, sequences split per source, the Austen novels, NPZ for agents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.text.austen import NOVELS, TextDataError, find_austen_dir, load_austen
from coordinator.text.sequences import build_token_dataset, save_tokens_npz, split_positions, windows
from coordinator.text.tokenizer import ByteTokenizer
from edge_agent.textdata import load_token_npz


def test_byte_tokenizer_round_trips_any_text() -> None:
    tok = ByteTokenizer()
    text = "It is a truth universally acknowledged… — Émma"
    ids = tok.encode(text, bos=True, eos=True)
    assert tok.vocab_size == 259 and (tok.bos, tok.eos, tok.pad) == (256, 257, 258)
    assert ids[0] == tok.bos and ids[-1] == tok.eos and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    with pytest.raises(ValueError):
        tok.decode([259])


def test_windows_cover_every_target_once_and_pad_the_last() -> None:
    tokens = np.arange(10, dtype=np.uint16)
    seqs = windows(tokens, 4, pad_id=99)
    np.testing.assert_array_equal(seqs, [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 99, 99, 99]])
    targets = np.concatenate([s[1:] for s in seqs])
    assert sorted(t for t in targets.tolist() if t != 99) == list(range(1, 10))
    assert windows(tokens[:1], 4, 99).shape == (0, 5)


def test_splits_are_contiguous_per_source() -> None:
    assert split_positions(100) == [(0, 80), (80, 90), (90, 100)]
    texts = {"a": "a" * 200, "b": "b" * 100}
    ds = build_token_dataset("toy", texts, seq_len=8)
    assert ds.sources == ("a", "b") and ds.seq_len == 8 and ds.vocab_size == 259
    for x, y in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)):
        assert set(y.tolist()) == {0, 1}
        assert set(x[y == 1].ravel().tolist()) <= {ord("b"), 257, 258}  # no source leaks into another's rows
    assert len(ds.x_train) > 4 * len(ds.x_val)


def test_npz_round_trip_for_agents(tmp_path: Path) -> None:
    ds = build_token_dataset("toy", {"x": "hello world " * 20, "y": "goodbye " * 30}, seq_len=16)
    save_tokens_npz(tmp_path / "toy.npz", ds)
    back = load_token_npz(tmp_path / "toy.npz")
    np.testing.assert_array_equal(back.x_train, ds.x_train)
    assert back.sources == ds.sources and back.pad_id == ds.pad_id and back.vocab_size == ds.vocab_size


def test_missing_package_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("coordinator.text.austen.SEARCH_ROOTS", (tmp_path,))
    monkeypatch.delenv("SNAKE_AUSTEN_DIR", raising=False)
    with pytest.raises(TextDataError, match="apt-get download r-cran-janeaustenr"):
        find_austen_dir()


def test_the_six_novels_from_the_debian_package() -> None:
    pytest.importorskip("rdata")
    try:
        find_austen_dir()
    except TextDataError:
        pytest.skip("r-cran-janeaustenr not unpacked (tools/setup.sh does it)")
    novels = load_austen()
    assert list(novels) == list(NOVELS.values())
    assert novels["Pride & Prejudice"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in novels["Pride & Prejudice"]
    assert 4_000_000 < sum(len(t) for t in novels.values()) < 4_100_000
