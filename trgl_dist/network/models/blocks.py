"""Residual blocks that return their residue r(x) next to their output.

Every block of every backbone derives from :class:`Block`. A block computes
``x_{m+1} = act(shortcut(x_m) + r_m(x_m))`` and returns ``(x_{m+1}, [r_m(x_m)])`` so the
transport cost can be taken on the residue without hooks. Plain (shape-changing,
non-residual) blocks return an empty residue list. A block may return several residues
(a Swin block has an attention and an MLP branch): the list holds them all.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """Base class of every block: ``forward(x) -> (output, residues)``."""

    #: False for plain blocks, which return no residue (no transport term).
    has_residue: bool = True

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BatchNorm always follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """The 1x1 conv + BN projection shortcut used where a block changes shape."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut of the CIFAR ResNets (He et al. 2016, option A).

    Subsamples space by ``stride`` (``x[:, :, ::2, ::2]``) and zero-pads the channel
    dimension, half of the new channels before and the rest after the old ones, as in the
    common CIFAR ResNet-110 code the TRGL experiments build on.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option-A shortcut cannot shrink {in_channels}->{out_channels}")
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x_BCHW: Tensor) -> Tensor:
        subsampled = x_BCHW[:, :, :: self.stride, :: self.stride]
        return F.pad(subsampled, (0, 0, 0, 0, self.pad_before, self.pad_after))


def make_shortcut(in_channels: int, out_channels: int, stride: int, kind: str) -> nn.Module:
    """Identity when the shape is kept, else option A (``"A"``) or a projection (``"B"``)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "A":
        return OptionAShortcut(in_channels, out_channels, stride)
    return projection(in_channels, out_channels, stride)


class BasicBlock(Block):
    """Two 3x3 convolutions; residue = conv-BN-ReLU-conv-BN (last BN included)."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "A"
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = make_shortcut(in_channels, out_channels, stride, shortcut)

    def residue(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        r = self.residue(x)
        return F.relu(self.shortcut(x) + r), [r]


class Bottleneck(Block):
    """1x1 -> 3x3 -> 1x1 (expansion 4), BN after each; the last BN is in the residue.

    The stride sits on the 3x3 convolution (torchvision's "ResNet v1.5").
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = make_shortcut(in_channels, out_channels, stride, "B")

    def residue(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.bn3(self.conv3(h))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        r = self.residue(x)
        return F.relu(self.shortcut(x) + r), [r]
