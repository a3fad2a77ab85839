"""A byte-level tokenizer: UTF-8 bytes are tokens 0..255, then a few specials. No dependencies, no
training, no unknown tokens; any text round-trips exactly."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BYTES = 256


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
