"""Auxiliary heads: structure, pooled sizes, exact outputs, and both layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trgl_dist.network.heads import HEAD_NAMES, build_head, pooled_side


@pytest.mark.parametrize(
    ("side", "pooled"), [(96, 4), (32, 4), (16, 4), (8, 2), (7, 2), (2, 2), (1, 1)]
)
def test_pooled_side(side: int, pooled: int) -> None:
    assert pooled_side(side) == pooled


@pytest.mark.parametrize("kind", HEAD_NAMES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_every_head_gives_logits(kind: str, layout: str) -> None:
    sample_shape = (6, 5, 5) if layout == "NCHW" else (5, 5, 6)
    head = build_head(kind, sample_shape, num_classes=7, layout=layout)
    assert head(torch.randn(3, *sample_shape)).shape == (3, 7)


def test_one_cnn_head_structure() -> None:
    head = build_head("1cnn", (16, 32, 32), num_classes=10)
    conv, relu, pool, norm, flatten, linear = head
    assert isinstance(conv, nn.Conv2d) and conv.bias is None
    assert conv.in_channels == conv.out_channels == 16 and conv.kernel_size == (3, 3)
    assert isinstance(relu, nn.ReLU) and isinstance(flatten, nn.Flatten)
    assert isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size == (4, 4)
    assert isinstance(norm, nn.BatchNorm2d) and norm.num_features == 16
    assert isinstance(linear, nn.Linear) and linear.in_features == 16 * 4 * 4


def test_one_cnn_head_on_a_small_map_pools_to_two() -> None:
    head = build_head("1cnn", (64, 8, 8), num_classes=10)
    assert head[-1].in_features == 64 * 2 * 2


def test_linear_head_is_global_average_then_linear() -> None:
    head = build_head("linear", (2, 3, 3), num_classes=2)
    linear = head[-1]
    assert isinstance(linear, nn.Linear)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, -2.0]]))
        linear.bias.copy_(torch.tensor([0.5, 0.0]))
    x = torch.zeros(1, 2, 3, 3)
    x[0, 0] = 9.0  # mean 9
    x[0, 1, 0, 0] = 18.0  # mean 2
    torch.testing.assert_close(head(x), torch.tensor([[9.5, 5.0]]))


def test_mlp_head_hidden_width() -> None:
    narrow = build_head("mlp", (16, 4, 4), num_classes=10)
    wide = build_head("mlp", (512, 4, 4), num_classes=10)
    assert narrow[2].out_features == 256
    assert wide[2].out_features == 512
    assert isinstance(narrow[3], nn.ReLU)


def test_channels_last_head_normalizes_then_runs_the_channels_first_head() -> None:
    torch.manual_seed(0)
    head = build_head("1cnn", (4, 4, 6), num_classes=3, layout="NHWC").eval()
    norm, _, conv = head[0], head[1], head[2]
    assert isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (6,)
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == 6
    x_BHWC = torch.randn(2, 4, 4, 6)
    normalized_BCHW = nn.functional.layer_norm(x_BHWC, (6,)).permute(0, 3, 1, 2)
    torch.testing.assert_close(head(x_BHWC), head[2:](normalized_BCHW))


def test_bad_requests_are_rejected() -> None:
    with pytest.raises(ValueError, match="1cnn"):
        build_head("conv2", (4, 4, 4), 10)
    with pytest.raises(ValueError, match="layout"):
        build_head("linear", (4, 4, 4), 10, layout="NCWH")
    with pytest.raises(ValueError, match="3-d"):
        build_head("linear", (4,), 10)
