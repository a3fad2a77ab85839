"""Tiny random OPT checkpoints written as Hugging Face writes them (config.json + model.safetensors), with or
without a byte-level BPE tokenizer trained in place with ``tokenizers`` (specials first, as OPT's:
<s> 0, <pad> 1, </s> 2, <unk> 3). Nothing is downloaded."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
TINY_OPT = {
    "hidden_size": 16, "num_hidden_layers": 2, "ffn_dim": 32, "num_attention_heads": 2, "max_position_embeddings": 32,
    "word_embed_proj_dim": 16, "dropout": 0.0, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
}  # fmt: skip


def write_opt(directory: Path, vocab_size: int, seed: int = 0, **overrides: Any) -> Path:
    """A random OPT (``TINY_OPT`` with ``overrides``) saved into ``directory``."""
    import torch
    import transformers

    from models.opt import opt_config

    torch.manual_seed(seed)
    config = opt_config(**(TINY_OPT | {"vocab_size": vocab_size} | overrides))
    transformers.OPTForCausalLM(config).save_pretrained(directory)
    return directory


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE (``tokenizers``) of at most ``vocab_size`` tokens trained on ``texts``."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=list(OPT_SPECIALS),
                            show_progress=False)  # fmt: skip
    return tok


def save_bpe(tok: Any, directory: Path, layout: str = "tokenizer.json") -> None:
    """Save ``tok`` as ``tokenizer.json`` or as ``vocab.json`` + ``merges.txt`` (OPT's layout)."""
    if layout == "tokenizer.json":
        tok.save(str(directory / "tokenizer.json"))
    else:
        tok.save_model(str(directory))
