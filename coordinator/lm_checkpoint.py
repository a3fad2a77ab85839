"""A text trial whose base is a checkpoint (``opt:PATH``): the model's token facts and its tokenizer.

The checkpoint is the base model: no pretraining, the agents fine-tune on every novel's whole train
part. Its corpus is tokenized for its vocabulary:

1. a Hugging Face tokenizer in the directory (``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` as
   OPT checkpoints ship it): :mod:`coordinator.text.hf_tokenizer`;
2. else UTF-8 bytes, when the vocabulary holds 256 ids above the model's special ids
   (:class:`~coordinator.text.tokenizer.OffsetByteTokenizer`; a random or byte-trained checkpoint);
3. else a :class:`~coordinator.errors.ConfigError` that says to put the tokenizer in the directory.

Padding uses the model's ``pad_token_id`` (OPT: 1), each source ends with its ``eos_token_id``; padded
targets become the loss's ``ignore_index`` as for ``gpt`` (:func:`edge_agent.textdata.lm_pairs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from coordinator.config import OPT_PREFIX, LmConfig, TrialConfig
from coordinator.errors import ConfigError
from coordinator.text.hf_tokenizer import HfTokenizer, tokenizer_files
from coordinator.text.tokenizer import BYTES, OffsetByteTokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenFacts:
    """What the corpus must fit: from the checkpoint's ``config.json``."""

    directory: Path
    vocab_size: int  # rows of the token embedding = logits per position
    pad: int
    eos: int
    bos: int | None
    max_positions: int


def checkpoint_dir(model: str) -> Path | None:
    """The directory of an ``opt:PATH`` model name, else None."""
    return Path(model[len(OPT_PREFIX) :]).expanduser() if model.startswith(OPT_PREFIX) else None


def token_facts(directory: Path) -> TokenFacts:
    """Read the checkpoint's config (offline); a ConfigError names what is missing."""
    from models.opt import load_opt_config

    try:
        config = load_opt_config(directory)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ConfigError(f"opt:{directory}: {exc}") from exc
    pad, eos, bos = config.pad_token_id, config.eos_token_id, config.bos_token_id
    if pad is None or eos is None:
        raise ConfigError(f"opt:{directory}: config.json sets no pad_token_id / eos_token_id (OPT's are 1 and 2)")
    return TokenFacts(directory, int(config.vocab_size), int(pad), int(eos), None if bos is None else int(bos),
                      int(config.max_position_embeddings))  # fmt: skip


def byte_tokenizer(facts: TokenFacts) -> OffsetByteTokenizer | None:
    """Bytes above the model's special ids below 256 (OPT: pad 1, bos/eos 2 -> bytes at 3..258), if they fit."""
    low = [i for i in (facts.pad, facts.eos, facts.bos) if i is not None and i < BYTES]
    offset = max(low) + 1 if low else 0
    specials = {facts.pad, facts.eos}
    if offset + BYTES > facts.vocab_size or any(offset <= s < offset + BYTES for s in specials):
        return None
    return OffsetByteTokenizer(offset, facts.vocab_size, facts.pad, facts.eos)


def choose_tokenizer(facts: TokenFacts) -> tuple[Tokenizer, str]:
    """The checkpoint's own tokenizer, else bytes if they fit, else a ConfigError; and a description."""
    files = tokenizer_files(facts.directory)
    if files:
        tok = HfTokenizer(files, facts.vocab_size, facts.pad, facts.eos, facts.bos)
        if tok.size > facts.vocab_size:
            raise ConfigError(f"the tokenizer in {facts.directory} has {tok.size} tokens, more than the model's "
                              f"{facts.vocab_size} ids: it is not this model's tokenizer")  # fmt: skip
        return tok, f"Hugging Face tokenizer {tok.describe()}"
    fallback = byte_tokenizer(facts)
    if fallback is None:
        raise ConfigError(
            f"opt:{facts.directory} holds no tokenizer (tokenizer.json, or vocab.json + merges.txt) and its "
            f"vocabulary of {facts.vocab_size} ids cannot hold the 256 byte ids above its special ids: put the "
            "model's Hugging Face tokenizer in that directory (tokenizer.save_pretrained(DIR))"
        )
    return (
        fallback,
        f"byte-level (no tokenizer in the directory): bytes are ids {fallback.offset}..{fallback.offset + 255}",
    )


def checkpoint_tokenizer(directory: Path, lm: LmConfig) -> tuple[Tokenizer, str]:
    """The tokenizer of a checkpoint trial, with the sequence length checked against the model's positions."""
    facts = token_facts(directory)
    if lm.seq_len > facts.max_positions:
        raise ConfigError(f"lm.seq_len {lm.seq_len} exceeds the model's max_position_embeddings "
                          f"{facts.max_positions} (opt:{directory}): use --seq-len {facts.max_positions} or less")  # fmt: skip
    return choose_tokenizer(facts)


def note_unused_pretraining(config: TrialConfig) -> None:
    """A log line when pretraining settings were changed that a checkpoint trial does not use."""
    defaults, lm = LmConfig(), config.lm
    changed = [f"lm.{name}" for name in ("pretrain_steps", "pretrain_fraction", "pretrain_batch_size", "pretrain_lr")
               if getattr(lm, name) != getattr(defaults, name)]  # fmt: skip
    if changed:
        log.info("%s: ignored, the checkpoint is the base model (no pretraining)", ", ".join(changed))
