"""Tokenizers of text trials: what a trial needs of one (:class:`Tokenizer`), and the byte-level ones.

- :class:`ByteTokenizer`: UTF-8 bytes are tokens 0..255, then a few specials (the project's ``gpt``). No
  dependencies, no training, no unknown tokens; any text round-trips exactly.
- :class:`OffsetByteTokenizer`: the same bytes mapped into a checkpoint's vocabulary, above its special ids
  (a model without a tokenizer of its own, e.g. an OPT directory that holds none).

A Hugging Face tokenizer saved beside a checkpoint is :mod:`coordinator.text.hf_tokenizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

BYTES = 256


def id_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest unsigned type holding ids below ``vocab_size`` (uint16 up to 65,536 ids)."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class Tokenizer(Protocol):
    """Text <-> token ids of one model's vocabulary: ids lie in [0, ``vocab_size``) (the model's logits);
    ``pad`` fills a short last window (its targets count for nothing), ``eos`` ends every source."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad(self) -> int: ...

    @property
    def eos(self) -> int: ...

    def encode(self, text: str, *, eos: bool = False) -> np.ndarray:
        """Unsigned token ids of ``text``, optionally followed by ``eos``."""
        ...

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of ``ids`` (special ids dropped)."""
        ...


@dataclass(frozen=True)
class ByteTokenizer:
    """Token ids: 0..255 the bytes, then ``specials`` in order (default <bos>, <eos>, <pad>)."""

    specials: tuple[str, ...] = ("<bos>", "<eos>", "<pad>")

    @property
    def vocab_size(self) -> int:
        return BYTES + len(self.specials)

    def special(self, name: str) -> int:
        """The id of a special token, e.g. ``special("<eos>")``."""
        try:
            return BYTES + self.specials.index(name)
        except ValueError:
            raise KeyError(f"no special token {name!r}; known: {', '.join(self.specials)}") from None

    @property
    def bos(self) -> int:
        return self.special("<bos>")

    @property
    def eos(self) -> int:
        return self.special("<eos>")

    @property
    def pad(self) -> int:
        return self.special("<pad>")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> np.ndarray:
        """uint16 token ids of ``text`` (UTF-8 bytes), optionally framed by <bos> / <eos>."""
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        head = [self.bos] if bos else []
        tail = [self.eos] if eos else []
        return np.concatenate([np.array(head, np.uint16), body, np.array(tail, np.uint16)])

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of ``ids``: byte tokens as UTF-8 (invalid sequences replaced), specials dropped."""
        values = np.asarray(ids, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        return bytes(values[values < BYTES].astype(np.uint8).tolist()).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class OffsetByteTokenizer:
    """UTF-8 bytes as ids ``offset`` .. ``offset + 255`` of a model's vocabulary of ``vocab`` ids, whose own
    ``pad`` and ``eos`` ids (below ``offset`` or above the bytes) keep their meaning."""

    offset: int
    vocab: int
    pad_id: int
    eos_id: int

    def __post_init__(self) -> None:
        if self.offset < 0 or self.offset + BYTES > self.vocab:
            raise ValueError(f"bytes at ids {self.offset}..{self.offset + BYTES - 1} do not fit {self.vocab} ids")
        for special in (self.pad_id, self.eos_id):
            if not 0 <= special < self.vocab or self.offset <= special < self.offset + BYTES:
                raise ValueError(f"special id {special} lies among the byte ids or outside the vocabulary")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def pad(self) -> int:
        return self.pad_id

    @property
    def eos(self) -> int:
        return self.eos_id

    def encode(self, text: str, *, eos: bool = False) -> np.ndarray:
        dtype = id_dtype(self.vocab)
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype) + dtype(self.offset)
        return np.concatenate([body, np.array([self.eos_id] if eos else [], dtype)])

    def decode(self, ids: np.ndarray | list[int]) -> str:
        values = np.asarray(ids, dtype=np.int64)
        values = values[(values >= self.offset) & (values < self.offset + BYTES)] - self.offset
        return bytes(values.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
