"""A small VGG-style network for 32x32 inputs, built with torchvision's own VGG layer maker."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.vgg import make_layers

CONFIG = [32, 32, "M", 64, 64, "M", 128, 128, "M"]


class VGGSmall(nn.Module):
    """Three VGG stages (32/64/128 channels, BatchNorm), global average pool, linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        features = make_layers(CONFIG, batch_norm=True)
        if in_channels != 3:
            features[0] = nn.Conv2d(in_channels, CONFIG[0], kernel_size=3, padding=1)
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(CONFIG[-2], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def vgg_small(num_classes: int = 10, in_channels: int = 3) -> VGGSmall:
    """VGG-style 6-conv network for 32x32 images."""
    return VGGSmall(num_classes, in_channels)
