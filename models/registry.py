"""Registry: model name -> builder, plus the layer-group contract."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from models.cnn import CNN, CNNConfig
from models.gpt import GPT, GPTConfig
from models.mlp import MLP, MLPConfig
from models.vgg import VGG, VGGConfig


@dataclass(frozen=True)
class InputSpec:
    """What the data set looks like to the model."""

    channels: int = 1  # image channels
    height: int = 28  # pixels
    width: int = 28  # pixels
    num_classes: int = 10  # classes; for a language model the vocabulary size
    seq_len: int = 0  # tokens per sample (language models only; 0 = not a token model)


def _mlp(spec: InputSpec) -> nn.Module:
    return MLP(MLPConfig(in_features=spec.channels * spec.height * spec.width, num_classes=spec.num_classes))


def _cnn(spec: InputSpec) -> nn.Module:
    return CNN(CNNConfig(in_channels=spec.channels, image_size=spec.height, num_classes=spec.num_classes))


def _vgg11(spec: InputSpec) -> nn.Module:
    return VGG(VGGConfig(in_channels=spec.channels, image_size=spec.height, num_classes=spec.num_classes))


def _gpt(spec: InputSpec) -> nn.Module:
    if spec.seq_len < 1:
        raise ValueError("the gpt model needs InputSpec.seq_len (tokens per sample)")
    return GPT(GPTConfig(vocab_size=spec.num_classes, block_size=spec.seq_len))


MODELS: dict[str, Callable[[InputSpec], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "vgg11": _vgg11,
    "gpt": _gpt,
}


OPT_PREFIX = "opt:"  # "opt:PATH": the OPT model saved in the local Hugging Face directory PATH


def _opt(path: str, spec: InputSpec) -> nn.Module:
    from pathlib import Path

    from models.opt import load_opt  # transformers is imported only for OPT models

    if spec.seq_len < 1:
        raise ValueError("an opt model needs InputSpec.seq_len (tokens per sample)")
    model = load_opt(Path(path))
    vocab, positions = int(model.config.vocab_size), int(model.config.max_position_embeddings)
    if spec.num_classes > vocab or spec.seq_len > positions:
        raise ValueError(
            f"the data ({spec.num_classes} token ids, {spec.seq_len} per sample) does not fit the OPT model "
            f"in {path} ({vocab} token ids, {positions} positions)"
        )
    return model


def build_model(name: str, spec: InputSpec) -> nn.Module:
    """Build a model by registry name: freshly initialised, or ``opt:PATH`` loaded from a local directory."""
    if name.startswith(OPT_PREFIX):
        return _opt(name[len(OPT_PREFIX) :], spec)
    try:
        builder = MODELS[name]
    except KeyError:
        known = ", ".join([*sorted(MODELS), f"{OPT_PREFIX}PATH"])
        raise KeyError(f"unknown model {name!r}; known: {known}") from None
    return builder(spec)


def layer_groups(model: nn.Module) -> list[str]:
    """Ordered layer-group prefixes (input side first).

    A group is a top-level child module that owns parameters. Every parameter
    and buffer name starts with exactly one group prefix followed by a dot.
    """
    groups = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    group_names = getattr(model, "group_names", None)  # a model may name its groups itself
    if callable(group_names):
        groups = list(group_names())
    return groups
