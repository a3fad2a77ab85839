"""Text for an OPT checkpoint (``opt:PATH``): which tokenizer maps the corpus to its vocabulary (its own
Hugging Face tokenizer in either layout, else bytes above its special ids, else a clear error), its pad and
eos ids, the sequence length against its positions, and the trial settings it refuses or ignores."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from coordinator.config import LmConfig, load_trial  # noqa: E402
from coordinator.errors import ConfigError  # noqa: E402
from coordinator.lm_checkpoint import (  # noqa: E402
    checkpoint_tokenizer,
    choose_tokenizer,
    note_unused_pretraining,
    token_facts,
)
from coordinator.text.austen import TextDataError  # noqa: E402
from coordinator.text.hf_tokenizer import HfTokenizer  # noqa: E402
from coordinator.text.sequences import build_token_dataset  # noqa: E402
from coordinator.text.tokenizer import OffsetByteTokenizer  # noqa: E402
from edge_agent.protocol.manifest import IGNORE_INDEX  # noqa: E402
from edge_agent.textdata import lm_pairs  # noqa: E402
from tests.coordinator.opt_tiny import save_bpe, train_bpe, write_opt  # noqa: E402

pytestmark = [pytest.mark.torch]

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    'neighbourhood, this truth is so well fixed in the minds of the surrounding families. "My dear Mr. Bennet," '
    'said his lady to him one day, "have you heard that Netherfield Park is let at last?" Émma — naïve.\n'
)
BPE_VOCAB = 300


@pytest.fixture(scope="module")
def bpe() -> object:
    return train_bpe([TEXT] * 20, BPE_VOCAB)


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab.json+merges.txt"])
def test_the_checkpoints_own_tokenizer_encodes_and_decodes(bpe: object, layout: str, tmp_path: Path) -> None:
    write_opt(tmp_path, vocab_size=320)  # the model's vocabulary may be larger than the tokenizer (OPT: 50272)
    save_bpe(bpe, tmp_path, layout)
    tok, described = choose_tokenizer(token_facts(tmp_path))
    assert isinstance(tok, HfTokenizer) and (tok.vocab_size, tok.pad, tok.eos) == (320, 1, 2)
    assert layout.split("+")[0] in described and f"{BPE_VOCAB} tokens" in described
    ids = tok.encode(TEXT, eos=True)
    assert ids[-1] == 2 and ids.dtype == np.uint16
    assert len(ids) < 0.8 * len(TEXT.encode())  # merges, not bytes (40 merges in 300 tokens)
    assert ids[:-1].min() >= 4  # text never yields <s>, <pad>, </s>, <unk>
    assert tok.decode(ids) == TEXT  # </s> dropped, Unicode intact
    assert tok.encode("Netherfield").tolist() == bpe.encode("Netherfield").ids  # type: ignore[attr-defined]


def test_without_a_tokenizer_bytes_sit_above_the_special_ids(tmp_path: Path) -> None:
    write_opt(tmp_path, vocab_size=260)
    tok, described = choose_tokenizer(token_facts(tmp_path))
    assert isinstance(tok, OffsetByteTokenizer) and "byte-level" in described
    assert (tok.offset, tok.pad, tok.eos) == (3, 1, 2)  # OPT: pad 1, bos/eos 2 -> bytes at 3..258
    ids = tok.encode(TEXT, eos=True)
    assert ids[:-1].min() >= 3 and ids[:-1].max() <= 258 and ids[-1] == 2
    assert tok.decode(ids) == TEXT
    ds = build_token_dataset("toy", {"a": TEXT * 3}, seq_len=16, tokenizer=tok)
    assert (ds.vocab_size, ds.pad_id) == (260, 1)
    last = ds.x_test[-1]  # the source's last window: its eos, then the model's pad (125 test tokens, T 16)
    end = last.tolist().index(2)
    assert end < 16 and (last[end + 1 :] == 1).all()
    _, labels = lm_pairs(ds.x_test[-1:], ds.pad_id)
    assert (labels[0, end:] == IGNORE_INDEX).all() and (labels[0, :end] != IGNORE_INDEX).all()


def test_a_vocabulary_too_small_for_bytes_names_the_fix(tmp_path: Path) -> None:
    write_opt(tmp_path, vocab_size=258)  # 3 + 256 ids needed
    with pytest.raises(ConfigError, match=r"holds no tokenizer .* 258 ids .*put the model's Hugging Face tokenizer"):
        choose_tokenizer(token_facts(tmp_path))


def test_a_tokenizer_larger_than_the_model_is_refused(bpe: object, tmp_path: Path) -> None:
    write_opt(tmp_path, vocab_size=290)
    save_bpe(bpe, tmp_path)
    with pytest.raises(ConfigError, match=f"{BPE_VOCAB} tokens, more than the model's 290"):
        choose_tokenizer(token_facts(tmp_path))


def test_sequence_length_must_fit_the_models_positions(tmp_path: Path) -> None:
    write_opt(tmp_path, vocab_size=300)  # max_position_embeddings 32
    assert isinstance(checkpoint_tokenizer(tmp_path, LmConfig(seq_len=32))[0], OffsetByteTokenizer)
    with pytest.raises(ConfigError, match="lm.seq_len 33 exceeds the model's max_position_embeddings 32"):
        checkpoint_tokenizer(tmp_path, LmConfig(seq_len=33))
    with pytest.raises(ConfigError, match="config.json"):
        checkpoint_tokenizer(tmp_path / "missing", LmConfig())


def test_a_pad_id_that_text_yields_is_refused() -> None:
    tok = OffsetByteTokenizer(offset=0, vocab=300, pad_id=299, eos_id=298)
    ds = build_token_dataset("toy", {"a": TEXT}, seq_len=8, tokenizer=tok)
    assert ds.pad_id == 299
    clash = OffsetByteTokenizer(offset=0, vocab=300, pad_id=299, eos_id=298)
    object.__setattr__(clash, "pad_id", ord("e"))  # a regular token as pad: its targets would be ignored
    with pytest.raises(TextDataError, match="pad id 101"):
        build_token_dataset("toy", {"a": TEXT}, seq_len=8, tokenizer=clash)


def test_trial_settings_for_a_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = f"opt:{tmp_path}"
    config = load_trial(None, {"model": model, "dataset": "austen", "lm.pretrain_steps": 500})
    assert config.is_checkpoint and config.is_text and config.train.max_steps == 40  # text defaults apply
    with caplog.at_level(logging.INFO, logger="coordinator.lm_checkpoint"):
        note_unused_pretraining(config)
    assert "lm.pretrain_steps: ignored, the checkpoint is the base model" in caplog.text
    with pytest.raises(ConfigError, match="its own base"):
        load_trial(None, {"model": model, "dataset": "austen", "lm.base_model": "none"})
    with pytest.raises(ConfigError, match="is a language model"):
        load_trial(None, {"model": model, "dataset": "fashion-mnist"})
    with pytest.raises(ConfigError, match="directory after the colon"):
        load_trial(None, {"model": "opt:", "dataset": "austen"})
