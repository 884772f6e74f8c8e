"""Auxiliary classifiers F_k: the head each module is trained through.

``1cnn`` is the DGL/TRGL default: conv3x3 (C->C, no bias) -> ReLU -> average-pool to a
small map -> BatchNorm -> flatten -> Linear. ``linear`` (global average pool + Linear) is
what the paper uses on transformers; ``mlp`` is pool + Linear-ReLU-Linear.
"""

from __future__ import annotations

from torch import Tensor, nn

HEAD_NAMES = ("1cnn", "linear", "mlp")
LAYOUTS = ("NCHW", "NHWC")
MLP_MIN_HIDDEN = 256


class ChannelsLastToFirst(nn.Module):
    """(B, H, W, C) -> (B, C, H, W), so one set of convolutional heads serves both layouts."""

    def forward(self, x_BHWC: Tensor) -> Tensor:
        return x_BHWC.permute(0, 3, 1, 2)


def pooled_side(side: int) -> int:
    """Side of the 1cnn head's pooled map: 4 for maps of 16 or more, else 2 (1 for 1).

    4x4 keeps some layout on large early maps (32 px CIFAR, 96 px STL); 2x2 (the DGL
    default) on small late maps keeps the Linear layer small.
    """
    if side >= 16:
        return 4
    return min(side, 2)


def one_cnn_head(channels: int, height: int, width: int, num_classes: int) -> nn.Sequential:
    pool_hw = (pooled_side(height), pooled_side(width))
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(pool_hw),
        nn.BatchNorm2d(channels),
        nn.Flatten(),
        nn.Linear(channels * pool_hw[0] * pool_hw[1], num_classes),
    )


def linear_head(channels: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def mlp_head(channels: int, num_classes: int) -> nn.Sequential:
    hidden = max(channels, MLP_MIN_HIDDEN)
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def build_head(
    kind: str, in_shape: tuple[int, ...], num_classes: int, layout: str = "NCHW"
) -> nn.Module:
    """A head of ``kind`` for one sample's feature shape ``in_shape``.

    ``in_shape`` is (C, H, W), or (H, W, C) when ``layout`` is "NHWC". Channels-last
    features (a transformer's residual stream) are first layer-normalized, as timm does
    before its own classifier, then moved channels-first.
    """
    if kind not in HEAD_NAMES:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEAD_NAMES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if len(in_shape) != 3:
        raise ValueError(f"head input must be one sample's 3-d feature shape, got {in_shape}")
    if layout == "NHWC":
        height, width, channels = in_shape
    else:
        channels, height, width = in_shape
    if kind == "1cnn":
        head = one_cnn_head(channels, height, width, num_classes)
    elif kind == "linear":
        head = linear_head(channels, num_classes)
    else:
        head = mlp_head(channels, num_classes)
    if layout == "NHWC":
        return nn.Sequential(nn.LayerNorm(channels), ChannelsLastToFirst(), *head)
    return head
