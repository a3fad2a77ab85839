"""OPT-architecture causal language models (Meta's OPT, through Hugging Face ``transformers``) from a local directory.

Nothing is downloaded, ever: a model comes from a Hugging Face-format directory on disk (``config.json`` and
safetensors weights, as ``save_pretrained`` writes them) with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``,
or is built with random weights from a config (:func:`random_opt`, for benchmarks and tests).

:class:`OPT` re-groups the Hugging Face modules under layer-group prefixes (the modules themselves, so their
tensors and forward code are Hugging Face's):

- ``embed``: ``embed.tokens`` (token embedding, also the **tied** output projection: one owner, one wire
  name, ``embed.tokens.weight``, as in :mod:`models.gpt`), ``embed.positions`` (learned positions with
  OPT's offset of 2) and ``embed.project_in`` if the checkpoint has one;
- ``decoder.layers.0`` .. ``decoder.layers.{L-1}``: the decoder blocks;
- ``head``: ``head.final_layer_norm`` and ``head.project_out`` when the checkpoint has them (the group is
  left out when it holds no tensor, e.g. post-LayerNorm OPT-350m without projections).

The forward pass builds the causal mask and the position ids itself (sequences are left-aligned and never
padded on the left; padding is handled by the loss's ``ignore_index``), so the exported graph has no
attention-mask input: int64 token ids [B, T] in, logits [B, T, vocab] out. Attention is the "eager" kind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

POSITION_OFFSET = 2  # OPT's learned positions start at index 2 (fairseq's padding offset)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _transformers() -> Any:
    """Import ``transformers`` offline (this module sets HF_HUB_OFFLINE before the first import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    return transformers


class _Embed(nn.Module):
    def __init__(self, tokens: nn.Embedding, positions: nn.Embedding, project_in: nn.Module | None) -> None:
        super().__init__()
        self.tokens = tokens
        self.positions = positions
        self.project_in = project_in

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        positions = torch.arange(t, dtype=torch.long, device=idx.device) + POSITION_OFFSET  # [T]
        x = self.tokens(idx)  # [B, T, word_embed_proj_dim]
        if self.project_in is not None:
            x = self.project_in(x)
        out: torch.Tensor = x + F.embedding(positions, self.positions.weight)  # [B, T, C]
        return out


class _Head(nn.Module):
    def __init__(self, final_layer_norm: nn.Module | None, project_out: nn.Module | None) -> None:
        super().__init__()
        self.final_layer_norm = final_layer_norm
        self.project_out = project_out

    def forward(self, x: torch.Tensor, tok_weight: torch.Tensor) -> torch.Tensor:
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        out: torch.Tensor = x @ tok_weight.t()  # [B, T, V]
        return out


class _Decoder(nn.Module):
    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers


class OPT(nn.Module):
    """Groups: ``embed``, ``decoder.layers.0`` .. ``decoder.layers.{L-1}``, ``head`` (if it holds tensors)."""

    def __init__(self, hf_model: Any) -> None:
        super().__init__()
        config = hf_model.config
        config._attn_implementation = "eager"  # plain MatMul/Softmax attention: what the exporter handles
        self.config = config
        dec = hf_model.model.decoder
        self.embed = _Embed(dec.embed_tokens, dec.embed_positions, dec.project_in)
        self.decoder = _Decoder(dec.layers)
        self.head = _Head(dec.final_layer_norm, dec.project_out)
        self.max_positions = int(config.max_position_embeddings)

    def group_names(self) -> list[str]:
        groups = ["embed", *(f"decoder.layers.{i}" for i in range(len(self.decoder.layers)))]
        return groups + (["head"] if any(True for _ in self.head.parameters()) else [])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.max_positions:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings {self.max_positions}")
        x = self.embed(idx)  # [B, T, C]
        pos = torch.arange(t, device=idx.device)
        sees = pos[None, :] <= pos[:, None]  # [T, T]: position i sees 0..i (a few small ops, no T x T constant)
        zero = torch.zeros((), dtype=x.dtype)
        mask = torch.where(sees, zero, torch.finfo(x.dtype).min)[None, None]  # [1, 1, T, T] additive
        for layer in self.decoder.layers:
            x = layer(x, attention_mask=mask)
        logits: torch.Tensor = self.head(x, self.embed.tokens.weight)  # [B, T, V]
        return logits


def opt_config(**overrides: Any) -> Any:
    """An ``OPTConfig`` (Hugging Face) with eager attention; ``overrides`` as OPTConfig's keyword arguments."""
    config = _transformers().OPTConfig(**overrides)
    config._attn_implementation = "eager"
    return config


def random_opt(config: Any, seed: int = 0) -> OPT:
    """An :class:`OPT` with freshly initialised weights from ``config`` (an OPTConfig): no files read."""
    transformers = _transformers()
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    hf_model = transformers.OPTForCausalLM(config)
    return OPT(hf_model.float())


def _check_dir(model_dir: Path, need_weights: bool) -> None:
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    if need_weights and not any((model_dir / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(f"{model_dir} has no weights ({', '.join(_WEIGHT_FILES)})")


def load_opt_config(model_dir: Path) -> Any:
    """The OPTConfig of a local directory (``config.json``); checks it describes an OPT model."""
    directory = Path(model_dir)
    _check_dir(directory, need_weights=False)
    config = _transformers().AutoConfig.from_pretrained(directory, local_files_only=True)
    if getattr(config, "model_type", None) != "opt":
        raise ValueError(f"{directory} holds a {getattr(config, 'model_type', '?')!r} model, not an OPT model")
    config._attn_implementation = "eager"
    return config


def load_opt(model_dir: Path) -> OPT:
    """The OPT model saved in a local Hugging Face directory (config.json + weights), fp32, offline."""
    directory = Path(model_dir)
    _check_dir(directory, need_weights=True)
    config = load_opt_config(directory)
    hf_model = _transformers().OPTForCausalLM.from_pretrained(
        directory, config=config, local_files_only=True, dtype=torch.float32, attn_implementation="eager"
    )
    return OPT(hf_model.float())
