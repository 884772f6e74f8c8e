"""ResNet backbones: CIFAR-style (ResNet-110, small), bottleneck (50/101/152), K-M ResNet.

Each builder returns ``(stem, blocks)``; :func:`trgl_dist.network.models.build_backbone` wraps
them in a ``Backbone``. No global pooling and no final classifier: the auxiliary head of
the last module plays that role.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from trgl_dist.network.models.blocks import BasicBlock, Block, Bottleneck, conv3x3

if TYPE_CHECKING:
    from trgl_dist.network.models import InputSpec

CIFAR_DEFAULT_WIDTH = 16
BOTTLENECK_DEFAULT_WIDTH = 64
KM_DEFAULT_WIDTH = 256
BOTTLENECK_DEPTHS: dict[str, tuple[int, ...]] = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
}
#: Inputs up to this side keep full resolution in the bottleneck stem (CIFAR style).
SMALL_INPUT_MAX = 64


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """The 3x3 stem of the CIFAR-style networks."""
    return nn.Sequential(
        conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


def cifar_resnet(
    spec: InputSpec, blocks_per_stage: int, width: int = 0
) -> tuple[nn.Module, list[Block]]:
    """3 stages of basic blocks (width, 2*width, 4*width), option-A shortcuts.

    Stages 2 and 3 open with a stride-2 block. ResNet-110 is ``blocks_per_stage=18``.
    """
    width = width or CIFAR_DEFAULT_WIDTH
    stem = conv_bn_relu(spec.channels, width)
    blocks: list[Block] = []
    in_channels = width
    for stage in range(3):
        out_channels = width * 2**stage
        for index in range(blocks_per_stage):
            stride = 2 if stage > 0 and index == 0 else 1
            blocks.append(BasicBlock(in_channels, out_channels, stride, shortcut="A"))
            in_channels = out_channels
    return stem, blocks


def bottleneck_stem(spec: InputSpec, width: int) -> nn.Module:
    """Small inputs (<= 64 px): conv3x3 stride 1, since the ImageNet stem's 4x reduction
    would leave a 28-32 px image at 1x1 before the last stage. Larger inputs: the
    ImageNet stem, conv7x7 stride 2 + BN + ReLU + maxpool3x3 stride 2."""
    if spec.size <= SMALL_INPUT_MAX:
        return conv_bn_relu(spec.channels, width)
    return nn.Sequential(
        nn.Conv2d(spec.channels, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


def bottleneck_resnet(
    spec: InputSpec, depths: Sequence[int], width: int = 0
) -> tuple[nn.Module, list[Block]]:
    """ResNet-50/101/152: 4 stages of bottlenecks with planes width * (1, 2, 4, 8)."""
    width = width or BOTTLENECK_DEFAULT_WIDTH
    stem = bottleneck_stem(spec, width)
    blocks: list[Block] = []
    in_channels = width
    for stage, depth in enumerate(depths):
        planes = width * 2**stage
        for index in range(depth):
            stride = 2 if stage > 0 and index == 0 else 1
            blocks.append(Bottleneck(in_channels, planes, stride))
            in_channels = planes * Bottleneck.expansion
    return stem, blocks


def km_resnet(
    spec: InputSpec, num_modules: int, blocks_per_module: int, width: int = 0
) -> tuple[nn.Module, list[Block]]:
    """The paper's wide, shallow "K-M ResNet".

    Stem: conv3x3 stride 2 to ``width`` (256) filters + BN + ReLU. Then K*M basic blocks;
    the block opening the second half (index K*M // 2) downsamples by 2 and doubles the
    width, with a 1x1 conv + BN projection shortcut.
    """
    if num_modules < 1 or blocks_per_module < 1:
        raise ValueError(
            f"km-resnet needs num_modules >= 1 and blocks_per_module >= 1, "
            f"got {num_modules} and {blocks_per_module}"
        )
    width = width or KM_DEFAULT_WIDTH
    stem = conv_bn_relu(spec.channels, width, stride=2)
    num_blocks = num_modules * blocks_per_module
    blocks: list[Block] = []
    in_channels = width
    for index in range(num_blocks):
        is_midpoint = index == num_blocks // 2
        out_channels = 2 * in_channels if is_midpoint else in_channels
        stride = 2 if is_midpoint else 1
        blocks.append(BasicBlock(in_channels, out_channels, stride, shortcut="B"))
        in_channels = out_channels
    return stem, blocks
