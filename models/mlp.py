"""A plain multi-layer perceptron."""

from __future__ import annotations

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)  # [B, C*H*W]
        for i in range(len(self.config.hidden)):
            h = torch.relu(getattr(self, f"fc{i}")(h))  # [B, hidden_i]
        return self.head(h)  # [B, num_classes]
