"""A small convolutional network: the quick default model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 1  # grey images
    image_size: int = 28  # square input, pixels
    channels: tuple[int, ...] = (32, 64)  # one conv block (conv-BN-ReLU-pool) each
    hidden: int = 128  # width of the fully connected layer
    num_classes: int = 10


class ConvBlock(nn.Module):
    """conv 3x3 (same padding) -> BatchNorm -> ReLU -> max-pool 2x2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)  # [B, cout, H/2, W/2]


class CNN(nn.Module):
    """conv0..convK-1 -> fc -> head; one layer group per block."""

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        cin, size = config.in_channels, config.image_size
        for i, cout in enumerate(config.channels):
            self.add_module(f"conv{i}", ConvBlock(cin, cout))
            cin, size = cout, size // 2
        self.fc = nn.Linear(cin * size * size, config.hidden)
        self.head = nn.Linear(config.hidden, config.num_classes)

    def stages(self) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """(layer group, its step) in order: the forward pass, cuttable between groups (split learning)."""
        convs = [
            (f"conv{i}", getattr(self, f"conv{i}")) for i in range(len(self.config.channels))
        ]  # [B, C_i, H_i, W_i]
        return [
            *convs,
            ("fc", lambda x: torch.relu(self.fc(x.flatten(1)))),  # [B, hidden]
            ("head", self.head),  # [B, num_classes]
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return x
