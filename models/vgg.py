"""VGG-11 with BatchNorm (Simonyan & Zisserman, config "A"), the paper's CNN.

Adapted to small inputs the CIFAR way: the classifier is 512 -> 512 -> 512 ->
classes on the flattened final feature map, and a max-pool is skipped once the
feature map is 1x1 (so 28x28 Fashion-MNIST and 32x32 CIFAR-10 both work).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

VGG11_LAYOUT: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@dataclass(frozen=True)
class VGGConfig:
    in_channels: int = 1  # 1 for Fashion-MNIST, 3 for CIFAR-10
    image_size: int = 28  # square input, pixels
    layout: tuple[int | str, ...] = VGG11_LAYOUT  # conv widths, "M" = max-pool 2x2
    hidden: int = 512  # classifier width
    dropout: float = 0.0  # classifier dropout (0.5 in the ImageNet original)
    num_classes: int = 10


class VGGConv(nn.Module):
    """conv 3x3 -> BatchNorm -> ReLU, optionally followed by max-pool 2x2."""

    def __init__(self, cin: int, cout: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))  # [B, cout, H, W]
        return torch.max_pool2d(x, 2) if self.pool else x


class VGG(nn.Module):
    """features.0..7 (the 8 conv layers) and classifier.0..2: 11 weight layers, 11 groups."""

    def __init__(self, config: VGGConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        cin, size = config.in_channels, config.image_size
        widths = list(config.layout)
        for i, item in enumerate(widths):
            if item == "M":
                continue
            pool = i + 1 < len(widths) and widths[i + 1] == "M" and size >= 2
            layers.append(VGGConv(cin, int(item), pool))
            cin, size = int(item), size // 2 if pool else size
        self.features = nn.ModuleList(layers)
        flat = cin * size * size
        self.classifier = nn.ModuleList(
            [
                nn.Linear(flat, config.hidden),
                nn.Linear(config.hidden, config.hidden),
                nn.Linear(config.hidden, config.num_classes),
            ]
        )
        self.drop = nn.Dropout(config.dropout)

    def group_names(self) -> list[str]:
        return [f"features.{i}" for i in range(len(self.features))] + [
            f"classifier.{i}" for i in range(len(self.classifier))
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.features:
            x = layer(x)  # [B, C, H, W]
        h = x.flatten(1)  # [B, C*H*W]
        h = self.drop(torch.relu(self.classifier[0](h)))  # [B, hidden]
        h = self.drop(torch.relu(self.classifier[1](h)))  # [B, hidden]
        return self.classifier[2](h)  # [B, num_classes]
