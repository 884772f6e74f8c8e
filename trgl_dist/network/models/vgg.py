"""VGG-19 (configuration E, with BatchNorm) as a sequence of 16 single-conv blocks.

VGG has no skip connections and is not changed into a ResNet. A layer whose output
shape equals its input shape is "residual-compatible": its residue is the displacement
``out - x``, so the transport cost measures how far the layer moves its input. Layers
that change the shape (more channels, or a max-pool folded in) are plain blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from trgl_dist.network.models.blocks import Block, conv3x3

if TYPE_CHECKING:
    from trgl_dist.network.models import InputSpec

VGG_DEFAULT_WIDTH = 64
#: Configuration E: (channels as a multiple of the first stage's, convs) per stage;
#: every stage ends with a 2x2 max-pool.
VGG19_STAGES: tuple[tuple[int, int], ...] = ((1, 2), (2, 2), (4, 4), (8, 4), (8, 4))


class VGGLayer(Block):
    """conv3x3 -> BN -> ReLU, optionally followed by a 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool) -> None:
        super().__init__()
        self.conv = conv3x3(in_channels, out_channels)
        self.bn = nn.BatchNorm2d(out_channels)
        self.pool: nn.Module = nn.MaxPool2d(2) if pool else nn.Identity()
        self.has_residue = in_channels == out_channels and not pool

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = self.pool(F.relu(self.bn(self.conv(x))))
        # The displacement is the residue of a shape-preserving layer: x + (out - x) = out.
        return out, [out - x] if self.has_residue else []


def vgg19(spec: InputSpec, width: int = 0) -> tuple[nn.Module, list[Block]]:
    """16 VGG layers; the stem is the identity (the first conv is block 0).

    A stage's max-pool is dropped when the map is already 1x1, so small inputs never go
    below 1x1: 32 px keeps all five poolings (16, 8, 4, 2, 1), 28 px keeps four
    (14, 7, 3, 1) and its last layer becomes shape-preserving.
    """
    width = width or VGG_DEFAULT_WIDTH
    blocks: list[Block] = []
    in_channels, side = spec.channels, spec.size
    for multiple, num_convs in VGG19_STAGES:
        out_channels = width * multiple
        for index in range(num_convs):
            pool = index == num_convs - 1 and side >= 2
            blocks.append(VGGLayer(in_channels, out_channels, pool))
            in_channels = out_channels
        side = side // 2 if side >= 2 else side
    return nn.Identity(), blocks
