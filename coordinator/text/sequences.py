"""Token data sets for language models: texts -> fixed-length sequences, split per source, as NPZ.

Each source (a novel) becomes one token stream (<eos> after it), cut by position into contiguous
train / validation / test parts (by default 80 / 10 / 10 %, so no sequence of one split overlaps
another), each cut into non-overlapping windows of ``seq_len + 1`` tokens: a window is a model input
(its first ``seq_len`` tokens) and its next-token targets (its last ``seq_len``). A short last window is
filled with <pad>, whose targets the loss ignores. Pure logic apart from :func:`save_tokens_npz`.

The NPZ format agents read is :mod:`edge_agent.textdata`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from coordinator.text.austen import TextDataError, load_austen
from coordinator.text.tokenizer import ByteTokenizer, Tokenizer
from edge_agent.textdata import TokenDataset

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, validation, test: contiguous parts of each source


def windows(tokens: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """Non-overlapping windows [N, seq_len + 1] of ``tokens`` with stride ``seq_len`` (each target once);
    the last window is padded with ``pad_id``. Fewer than 2 tokens make no window."""
    if seq_len < 1:
        raise TextDataError(f"seq_len must be at least 1, got {seq_len}")
    dtype = np.promote_types(tokens.dtype, np.uint16)  # uint16 ids stay uint16; wider ids keep their type
    if len(tokens) < 2:
        return np.zeros((0, seq_len + 1), dtype)
    count = -(-(len(tokens) - 1) // seq_len)  # ceil: every token but the first is a target exactly once
    padded = np.full(count * seq_len + 1, pad_id, dtype)
    padded[: len(tokens)] = tokens
    starts = np.arange(count) * seq_len
    out: np.ndarray = padded[starts[:, None] + np.arange(seq_len + 1)]
    return out


def split_positions(length: int, fractions: Sequence[float] = SPLIT_FRACTIONS) -> list[tuple[int, int]]:
    """[start, end) of each split of a stream of ``length`` tokens (contiguous, in order, covering it)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise TextDataError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    cuts = [0, round(fractions[0] * length), round((fractions[0] + fractions[1]) * length), length]
    return [(cuts[i], cuts[i + 1]) for i in range(3)]


def build_token_dataset(
    name: str,
    texts: Mapping[str, str],
    seq_len: int,
    tokenizer: Tokenizer | None = None,
    fractions: Sequence[float] = SPLIT_FRACTIONS,
) -> TokenDataset:
    """Sequences of every source, split per source; ``y_*`` hold each sequence's source index. The
    tokenizer must never emit its pad id for text (those targets would be ignored)."""
    tok: Tokenizer = tokenizer or ByteTokenizer()
    if not texts:
        raise TextDataError("no texts to build a token data set from")
    parts: list[list[np.ndarray]] = [[], [], []]
    labels: list[list[np.ndarray]] = [[], [], []]
    for source, (name, text) in enumerate(texts.items()):
        stream = tok.encode(text, eos=True)
        check_stream(stream, tok, str(name))
        for split, (lo, hi) in enumerate(split_positions(len(stream), fractions)):
            seqs = windows(stream[lo:hi], seq_len, tok.pad)
            parts[split].append(seqs)
            labels[split].append(np.full(len(seqs), source, np.int64))
    x_train, x_val, x_test = (np.concatenate(p) for p in parts)
    y_train, y_val, y_test = (np.concatenate(y) for y in labels)
    return TokenDataset(name, x_train, y_train, x_val, y_val, x_test, y_test, tok.vocab_size, tok.pad, tuple(texts))


def check_stream(stream: np.ndarray, tok: Tokenizer, name: str) -> None:
    """A TextDataError if ``stream`` (``name``'s tokens) leaves the vocabulary or holds the pad id in its text."""
    if stream.size and int(stream.max()) >= tok.vocab_size:
        raise TextDataError(f"{name}: the tokenizer produced id {int(stream.max())}, beyond the vocabulary of "
                            f"{tok.vocab_size} ids")  # fmt: skip
    body = stream[:-1] if stream.size and int(stream[-1]) == tok.eos else stream
    if np.any(body == tok.pad):
        raise TextDataError(f"{name}: the tokenizer turns text into the pad id {tok.pad}, whose targets the loss "
                            "ignores; the pad id must be a special token the text never yields")  # fmt: skip


def austen_tokens(seq_len: int, directory: Path | None = None, tokenizer: Tokenizer | None = None) -> TokenDataset:
    """The data set ``austen``: the six novels, one source per novel (publication order); byte tokens
    unless ``tokenizer`` says otherwise."""
    return build_token_dataset("austen", load_austen(directory), seq_len, tokenizer)


def save_tokens_npz(path: Path | str, ds: TokenDataset) -> None:
    """Write ``ds`` in the token NPZ format of :mod:`edge_agent.textdata` (uncompressed)."""
    np.savez(
        Path(path),
        x_train=ds.x_train,
        y_train=ds.y_train,
        x_val=ds.x_val,
        y_val=ds.y_val,
        x_test=ds.x_test,
        y_test=ds.y_test,
        vocab_size=np.int64(ds.vocab_size),
        pad_id=np.int64(ds.pad_id),
        sources=np.array(ds.sources, dtype=np.str_),
    )
