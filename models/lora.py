"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for ``nn.Linear``.

A wrapped projection computes ``x W^T + b + scale * (x A^T) B^T`` with ``A`` [rank, in] (small random),
``B`` [out, rank] (zeros, so a fresh adapter changes nothing) and ``scale = alpha / rank``. The wrapper
*is* an ``nn.Linear`` (it keeps ``weight`` and ``bias`` where they were), so the base tensors keep their
wire names and the adapters get stable ones next to them: ``blocks.0.attn.qkv.lora_A``,
``blocks.0.attn.qkv.lora_B``. An adapter therefore belongs to the layer group of the block it sits in.

``apply_lora`` freezes every parameter of the model (``requires_grad = False``) and wraps the target
projections; only adapters are trainable. ``merge_lora`` folds ``scale * B A`` into ``weight`` and turns
each wrapper back into a plain ``nn.Linear``: the deployable model has the original structure.

Targets are module-name suffixes: ``attn.qkv``, ``attn.proj``, ``mlp.fc``, ``mlp.proj`` for
:mod:`models.gpt`; ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``, ``fc2`` for Hugging Face OPT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")  # wire names of adapters end in these
GPT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # every projection of a models.gpt block
OPT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # Hugging Face OPT decoder layers


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update: ``y = x W^T + b + scale * (x A^T) B^T``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        # built on the meta device (no allocation, no init of a weight thrown away at once), then given the base's
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight  # the same Parameter objects: names and values stay as they were
        self.bias = base.bias
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as the reference implementation (and peft)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = F.linear(x, self.weight, self.bias) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale
        return out

    def delta(self) -> torch.Tensor:
        """``scale * B A`` [out, in]: what merging adds to ``weight``."""
        return (self.lora_B @ self.lora_A) * self.scale

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the adapter folded into its weight."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(self.weight + self.delta())
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        plain.weight.requires_grad_(self.weight.requires_grad)
        if plain.bias is not None and self.bias is not None:
            plain.bias.requires_grad_(self.bias.requires_grad)
        return plain


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> list[str]:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose name ends in one of ``targets``; returns the
    adapter parameter names (the only trainable tensors), in ``named_parameters`` order.

    Raises ValueError for a bad rank, no targets, a target that matches nothing, or a model that has
    adapters already."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    if not targets:
        raise ValueError("LoRA needs at least one target projection")
    if has_lora(model):
        raise ValueError("the model has LoRA adapters already")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    unmatched = [t for t in targets if not any(_matches(n, [t]) for n, _ in linears)]
    if unmatched:
        known = sorted({n.split(".", 2)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA targets {unmatched} match no nn.Linear of the model; its projections: {known}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, linear in linears:
        _replace(model, name, LoRALinear(linear, rank, alpha))
    return adapter_names(model)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA adapter parameters of ``model`` (empty without LoRA)."""
    return [name for name, _ in model.named_parameters() if is_adapter(name)]


def is_adapter(name: str) -> bool:
    """Whether a wire name is a LoRA adapter's."""
    return name.endswith(ADAPTER_SUFFIXES)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put plain ``nn.Linear`` modules back; returns how many
    were merged. The model's parameter names are then those it had before :func:`apply_lora`."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in wrapped:
        _replace(model, name, module.merged())
    return len(wrapped)
