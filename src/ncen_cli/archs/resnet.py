"""CIFAR-style ResNet-(6n+2) members (He et al. 2016, section 4.2), as in the NCEn paper's Table I.

Three stages of 16/32/64 channels with ``n`` basic blocks each, option-A shortcuts (stride-2
subsampling plus zero channel padding, no parameters), global average pooling and a linear head.
resnet20: n=3, resnet26: n=4, resnet32: n=5. The first convolution takes as many channels as the
dataset has (1 for FashionMNIST, 3 for CIFAR-10), so 28x28 inputs go 28 -> 14 -> 7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ncen_cli.archs.base import ACTIVATIONS, Architecture
from ncen_cli.layers import BatchNorm2d, Conv2d


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride`` and zero-pad the extra channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H/stride), ceil(W/stride))."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            half = self.pad // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.pad - half))
        return x


class BasicBlock(nn.Module):
    """conv3x3-BN-act-conv3x3-BN, plus the shortcut, then act."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(out_channels)
        self.act1 = ACTIVATIONS[activation]()
        self.act2 = ACTIVATIONS[activation]()
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images. Maps (B, C, H, W) in [0, 1] to (B, num_classes) logits."""

    def __init__(
        self, blocks_per_stage: int, in_channels: int, num_classes: int, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.conv = Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = BatchNorm2d(16)
        self.act = ACTIVATIONS[activation]()
        layers: list[nn.Module] = []
        channels = 16
        for stage, width in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, width, stride, activation))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.act(self.bn(self.conv(x))))
        return self.fc(out.mean(dim=(2, 3)))


def _resnet(name: str, n: int) -> Architecture:
    def build(input_shape: tuple[int, int, int], num_classes: int, activation: str) -> nn.Module:
        return CifarResNet(n, input_shape[0], num_classes, activation)

    return Architecture(name, f"CIFAR ResNet-{6 * n + 2} (n={n}, option-A shortcut)", build, 4)


resnet20 = _resnet("resnet20", 3)
resnet26 = _resnet("resnet26", 4)
resnet32 = _resnet("resnet32", 5)
