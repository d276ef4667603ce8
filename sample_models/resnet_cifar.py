"""CIFAR-style ResNets (He et al. 2016, §4.2): 3 stages of 16/32/64 channels, 6n+2 layers.

Built from torchvision's BasicBlock, with the torchvision attribute names, so a state_dict of the
usual CIFAR ResNet-20 (conv1, bn1, layer1-3, fc; 1x1 conv + BN shortcuts) loads strictly.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem without max-pool, three stages, global average pool."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self._width = 16
        self.layer1 = self._stage(16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, width: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for index in range(blocks):
            block_stride = stride if index == 0 else 1
            downsample = None
            if block_stride != 1 or self._width != width:
                downsample = nn.Sequential(
                    nn.Conv2d(self._width, width, 1, stride=block_stride, bias=False), nn.BatchNorm2d(width)
                )
            layers.append(BasicBlock(self._width, width, block_stride, downsample))
            self._width = width
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet8(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 (1 block per stage)."""
    return CifarResNet(1, num_classes, in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (3 blocks per stage)."""
    return CifarResNet(3, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (9 blocks per stage)."""
    return CifarResNet(9, num_classes, in_channels)
