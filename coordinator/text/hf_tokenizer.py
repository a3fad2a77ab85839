"""A Hugging Face tokenizer saved in a checkpoint directory, through the ``tokenizers`` library (the one
adapter for it; ``transformers`` is not needed). Nothing is downloaded: only local files are read.

Two layouts, as checkpoints ship them:

- ``tokenizer.json`` (a "fast" tokenizer, as ``tokenizers`` or ``save_pretrained`` write it);
- ``vocab.json`` + ``merges.txt`` (a GPT-2-style byte-level BPE, as OPT checkpoints ship it), with the
  special tokens of ``special_tokens_map.json`` when the directory has one.

Text is encoded without the tokenizer's post-processing (no BOS added, no truncation, no padding): the
trial cuts its own windows and frames each source with the model's ``eos`` id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.text.austen import TextDataError
from coordinator.text.tokenizer import id_dtype

TOKENIZER_JSON = "tokenizer.json"
BPE_FILES = ("vocab.json", "merges.txt")
SPECIAL_TOKENS_MAP = "special_tokens_map.json"


def tokenizer_files(directory: Path) -> tuple[Path, ...]:
    """The tokenizer files of ``directory`` this module reads, the preferred layout first (empty: none)."""
    if (directory / TOKENIZER_JSON).is_file():
        return (directory / TOKENIZER_JSON,)
    if all((directory / name).is_file() for name in BPE_FILES):
        return tuple(directory / name for name in BPE_FILES)
    return ()


def _special_tokens(directory: Path) -> list[str]:
    """The special tokens named in ``special_tokens_map.json`` (strings or {"content": ...} entries)."""
    path = directory / SPECIAL_TOKENS_MAP
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TextDataError(f"{path} is not readable JSON: {exc}") from exc
    values = [v for entry in entries.values() for v in (entry if isinstance(entry, list) else [entry])]
    return [v["content"] if isinstance(v, dict) else str(v) for v in values if isinstance(v, (str, dict))]


def _load(files: Sequence[Path]) -> Any:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # agents are forked after it: no fork warning
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    try:
        if files[0].name == TOKENIZER_JSON:
            return Tokenizer.from_file(str(files[0]))
        tok = Tokenizer(models.BPE.from_file(str(files[0]), str(files[1])))
    except Exception as exc:  # tokenizers raises plain Exception subclasses for unreadable files
        raise TextDataError(f"cannot read the tokenizer {', '.join(map(str, files))}: {exc}") from exc
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [s for s in _special_tokens(files[0].parent) if tok.token_to_id(s) is not None]
    tok.add_special_tokens(specials)
    return tok


class HfTokenizer:
    """A ``tokenizers.Tokenizer`` mapping text to a model's vocabulary of ``vocab_size`` ids; decoding drops
    the tokenizer's special tokens and the model's ``pad``, ``eos`` and ``bos`` ids (even when the files do
    not mark them special, as a bare vocab.json + merges.txt does not)."""

    def __init__(self, files: Sequence[Path], vocab_size: int, pad: int, eos: int, bos: int | None = None) -> None:
        self.files = tuple(files)
        self._tok = _load(self.files)
        self._tok.no_truncation()
        self._tok.no_padding()
        self.size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self._vocab, self._pad, self._eos = vocab_size, pad, eos
        self._dropped = {pad, eos} | ({bos} if bos is not None else set())
        self._dtype = id_dtype(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def eos(self) -> int:
        return self._eos

    def encode(self, text: str, *, eos: bool = False) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.array([*ids, *([self._eos] if eos else [])], dtype=self._dtype)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        values = np.asarray(ids, dtype=np.int64).reshape(-1)
        known = [int(i) for i in values if 0 <= i < self.size and int(i) not in self._dropped]
        return str(self._tok.decode(known, skip_special_tokens=True))

    def describe(self) -> str:
        return f"{' + '.join(p.name for p in self.files)} ({self.size} tokens)"
