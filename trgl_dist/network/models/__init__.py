"""Backbones as a stem plus a list of blocks, built by name for an input shape."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from trgl_dist.network.models.blocks import Block
from trgl_dist.network.models.resnet import (
    BOTTLENECK_DEPTHS,
    bottleneck_resnet,
    cifar_resnet,
    km_resnet,
)
from trgl_dist.network.models.swin import swin_tiny
from trgl_dist.network.models.vgg import vgg19

__all__ = ["MODEL_NAMES", "Backbone", "Block", "InputSpec", "build_backbone"]

MODEL_NAMES: tuple[str, ...] = (
    "resnet-small",
    "resnet110",
    "resnet50",
    "resnet101",
    "resnet152",
    "vgg19",
    "km-resnet",
    "swin-tiny",
)
SMALL_BLOCKS_PER_STAGE = 3  # 9 blocks: enough for 8 modules in the CPU demo
RESNET110_BLOCKS_PER_STAGE = 18


@dataclass(frozen=True)
class InputSpec:
    """One sample's input shape and the number of classes, e.g. 1x28x28 with 10 classes."""

    channels: int
    size: int
    num_classes: int


@dataclass
class Backbone:
    """A network before it is cut into modules: the stem goes to module 1."""

    stem: nn.Module
    blocks: list[Block]
    layout: str = "NCHW"  # "NHWC" for Swin: timm's features are channels-last
    init: bool = True  # apply the paper's init; False keeps timm's own (Swin)
    name: str = ""


def build_backbone(
    name: str,
    spec: InputSpec,
    *,
    num_modules: int,
    width: int = 0,
    blocks_per_module: int = 2,
) -> Backbone:
    """Build ``name`` for ``spec``. ``width`` 0 is the model's default (16 for the CIFAR
    ResNets, 64 for bottleneck ResNets and VGG, 256 for K-M ResNet, 96 for Swin).
    ``num_modules`` and ``blocks_per_module`` shape the K-M ResNet only."""
    if name == "resnet-small":
        stem, blocks = cifar_resnet(spec, SMALL_BLOCKS_PER_STAGE, width)
    elif name == "resnet110":
        stem, blocks = cifar_resnet(spec, RESNET110_BLOCKS_PER_STAGE, width)
    elif name in BOTTLENECK_DEPTHS:
        stem, blocks = bottleneck_resnet(spec, BOTTLENECK_DEPTHS[name], width)
    elif name == "vgg19":
        stem, blocks = vgg19(spec, width)
    elif name == "km-resnet":
        stem, blocks = km_resnet(spec, num_modules, blocks_per_module, width)
    elif name == "swin-tiny":
        stem, blocks = swin_tiny(spec, width)
        return Backbone(stem, blocks, layout="NHWC", init=False, name=name)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return Backbone(stem, blocks, name=name)
