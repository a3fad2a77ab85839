"""Cutting a model between two layer groups (split learning): a front and a back that share its modules.

Every registry model lists its forward pass as ``stages()``: (layer group, step) in order. A
:class:`ModelPart` runs a contiguous run of those stages and registers the model's top-level
modules it needs under their own names, so its parameter paths are the wire names. Both parts
share the model's tensors: training either part trains the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

Stage = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


class ModelPart(nn.Module):
    """Stages ``[lo, hi)`` of ``model`` as a module (input: the activation entering stage ``lo``)."""

    def __init__(self, model: nn.Module, lo: int, hi: int) -> None:
        super().__init__()
        stages: Sequence[Stage] = model.stages()  # type: ignore[operator]
        if not 0 <= lo < hi <= len(stages):
            raise ValueError(f"stages [{lo}, {hi}) out of range for {len(stages)} stages")
        self.groups = tuple(name for name, _ in stages[lo:hi])
        for top in dict.fromkeys(name.split(".")[0] for name in self.groups):
            self.add_module(top, getattr(model, top))
        self._steps = [step for _, step in stages[lo:hi]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self._steps:
            x = step(x)
        return x

    def owns(self, name: str) -> bool:
        """Whether tensor ``name`` (a wire name) belongs to one of this part's layer groups."""
        return any(name.startswith(group + ".") for group in self.groups)


def split_model(model: nn.Module, cut: str) -> tuple[ModelPart, ModelPart]:
    """(front, back): the front ends with layer group ``cut``; the back holds every later group."""
    names = [name for name, _ in model.stages()]  # type: ignore[operator]
    if cut not in names[:-1]:
        raise ValueError(f"cannot cut after {cut!r}: choose one of {', '.join(names[:-1])}")
    at = names.index(cut) + 1
    return ModelPart(model, 0, at), ModelPart(model, at, len(names))
