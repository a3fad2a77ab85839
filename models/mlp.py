"""A plain multi-layer perceptron."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 784  # flattened input size (28*28 for Fashion-MNIST)
    hidden: tuple[int, ...] = (512, 256, 128)  # one group per hidden layer
    num_classes: int = 10


class MLP(nn.Module):
    """fc0 .. fcN-1 (Linear + ReLU) then head (Linear). One layer group each."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        sizes = (config.in_features, *config.hidden)
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            self.add_module(f"fc{i}", nn.Linear(fan_in, fan_out))
        self.head = nn.Linear(sizes[-1], config.num_classes)

    def stages(self) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """(layer group, its step) in order: the forward pass, cuttable between groups (split learning)."""

        def hidden(layer: nn.Module, flatten: bool) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda h: torch.relu(layer(h.flatten(1) if flatten else h))  # [B, hidden_i]

        layers = [(f"fc{i}", hidden(getattr(self, f"fc{i}"), i == 0)) for i in range(len(self.config.hidden))]
        return [*layers, ("head", self.head)]  # [B, num_classes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return x
