"""Backbones: block counts, exact residues and shortcuts, and a local step on every one."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trgl_dist.method import local_loss
from trgl_dist.network.models import MODEL_NAMES, Block, InputSpec, build_backbone
from trgl_dist.network.models.blocks import BasicBlock, Bottleneck, OptionAShortcut
from trgl_dist.network.models.swin import PatchMergingBlock, SwinBlock, window_for
from trgl_dist.network.models.vgg import VGGLayer
from trgl_dist.network.modules import build_modules
from trgl_dist.network.split import equal_depth

CIFAR = InputSpec(3, 32, 10)
#: Small widths keep every model fast on a CPU; architecture is unchanged otherwise.
TEST_WIDTHS = {
    "resnet-small": 4,
    "resnet110": 4,
    "resnet50": 8,
    "resnet101": 8,
    "resnet152": 8,
    "vgg19": 8,
    "km-resnet": 8,
    "swin-tiny": 24,
}
INPUT_SPECS = [
    InputSpec(1, 28, 10),  # MNIST / Fashion-MNIST
    InputSpec(3, 32, 10),  # CIFAR-10
    InputSpec(3, 64, 200),  # TinyImageNet
    InputSpec(3, 96, 10),  # STL-10
    InputSpec(3, 224, 1000),  # ImageNet
]


def randomize_batchnorm(module: nn.Module) -> None:
    """Non-trivial affine and running statistics so a hand recomputation means something."""
    generator = torch.Generator().manual_seed(0)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            shape = layer.weight.shape
            layer.weight.data = torch.rand(shape, generator=generator) + 0.5
            layer.bias.data = torch.randn(shape, generator=generator)
            layer.running_mean = torch.randn(shape, generator=generator)
            layer.running_var = torch.rand(shape, generator=generator) + 0.5


def bn(layer: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """Eval-mode BatchNorm written out."""
    assert layer.running_mean is not None and layer.running_var is not None
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    shift = layer.bias - layer.running_mean * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def test_model_names_and_unknown_name() -> None:
    assert set(MODEL_NAMES) == set(TEST_WIDTHS)
    with pytest.raises(ValueError, match="resnet110.*swin-tiny"):
        build_backbone("resnet7", CIFAR, num_modules=2)


@pytest.mark.parametrize(
    ("name", "num_blocks"),
    [
        ("resnet110", 54),
        ("resnet-small", 9),
        ("resnet50", 16),
        ("resnet101", 33),
        ("resnet152", 50),
        ("vgg19", 16),
        ("swin-tiny", 15),
    ],
)
def test_block_counts(name: str, num_blocks: int) -> None:
    backbone = build_backbone(name, CIFAR, num_modules=2, width=TEST_WIDTHS[name])
    assert len(backbone.blocks) == num_blocks
    assert backbone.name == name


def test_resnet110_default_stages() -> None:
    backbone = build_backbone("resnet110", CIFAR, num_modules=4)
    blocks = backbone.blocks
    assert all(isinstance(b, BasicBlock) and b.has_residue for b in blocks)
    assert [blocks[i].conv1.out_channels for i in (0, 17, 18, 35, 36, 53)] == [
        16,
        16,
        32,
        32,
        64,
        64,
    ]
    strides = [b.conv1.stride[0] for b in blocks]
    assert [i for i, s in enumerate(strides) if s == 2] == [18, 36]
    assert isinstance(blocks[18].shortcut, OptionAShortcut)
    assert isinstance(blocks[1].shortcut, nn.Identity)
    h = backbone.stem(torch.zeros(2, 3, 32, 32))
    for block in blocks:
        h, _ = block(h)
    assert h.shape == (2, 64, 8, 8)


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    out = OptionAShortcut(4, 8, stride=2)(x)
    assert out.shape == (2, 8, 2, 2)
    assert torch.equal(out[:, 2:6], x[:, :, ::2, ::2])
    assert torch.equal(out[:, :2], torch.zeros(2, 2, 2, 2))
    assert torch.equal(out[:, 6:], torch.zeros(2, 2, 2, 2))


@pytest.mark.parametrize(("in_channels", "out_channels", "stride"), [(4, 4, 1), (4, 8, 2)])
def test_basic_block_residue_and_output_by_hand(
    in_channels: int, out_channels: int, stride: int
) -> None:
    torch.manual_seed(0)
    block = BasicBlock(in_channels, out_channels, stride, shortcut="A").eval()
    randomize_batchnorm(block)
    x = torch.randn(2, in_channels, 6, 6)
    out, residues = block(x)
    h = F.relu(bn(block.bn1, F.conv2d(x, block.conv1.weight, stride=stride, padding=1)))
    expected_r = bn(block.bn2, F.conv2d(h, block.conv2.weight, padding=1))
    assert len(residues) == 1
    torch.testing.assert_close(residues[0], expected_r)
    shortcut = x if stride == 1 else OptionAShortcut(in_channels, out_channels, stride)(x)
    torch.testing.assert_close(out, F.relu(shortcut + expected_r))


def test_bottleneck_residue_and_projection_by_hand() -> None:
    torch.manual_seed(0)
    block = Bottleneck(8, 4, stride=2).eval()  # 8 -> 16 channels, half the resolution
    randomize_batchnorm(block)
    x = torch.randn(2, 8, 6, 6)
    out, (r,) = block(x)
    h = F.relu(bn(block.bn1, F.conv2d(x, block.conv1.weight)))
    h = F.relu(bn(block.bn2, F.conv2d(h, block.conv2.weight, stride=2, padding=1)))
    expected_r = bn(block.bn3, F.conv2d(h, block.conv3.weight))
    conv, norm = block.shortcut[0], block.shortcut[1]
    shortcut = bn(norm, F.conv2d(x, conv.weight, stride=2))
    torch.testing.assert_close(r, expected_r)
    torch.testing.assert_close(out, F.relu(shortcut + expected_r))
    assert out.shape == (2, 16, 3, 3)


@pytest.mark.parametrize(("size", "first_kernel"), [(32, 3), (64, 3), (96, 7), (224, 7)])
def test_bottleneck_stem_depends_on_input_size(size: int, first_kernel: int) -> None:
    backbone = build_backbone("resnet50", InputSpec(3, size, 10), num_modules=2, width=8)
    assert backbone.stem[0].kernel_size == (first_kernel, first_kernel)
    has_maxpool = any(isinstance(m, nn.MaxPool2d) for m in backbone.stem.modules())
    assert has_maxpool == (size > 64)


def test_km_resnet_doubles_at_the_midpoint() -> None:
    backbone = build_backbone("km-resnet", CIFAR, num_modules=3, blocks_per_module=2, width=8)
    blocks = backbone.blocks
    assert len(blocks) == 6
    assert [b.conv1.out_channels for b in blocks] == [8, 8, 8, 16, 16, 16]
    assert [b.conv1.stride[0] for b in blocks] == [1, 1, 1, 2, 1, 1]
    assert isinstance(blocks[3].shortcut, nn.Sequential)  # 1x1 conv + BN projection
    assert all(isinstance(blocks[i].shortcut, nn.Identity) for i in (0, 1, 2, 4, 5))
    h = backbone.stem(torch.zeros(2, 3, 32, 32))
    assert h.shape == (2, 8, 16, 16)  # the stem downsamples
    for block in blocks:
        h, _ = block(h)
    assert h.shape == (2, 16, 8, 8)


def test_km_resnet_default_width_is_256() -> None:
    backbone = build_backbone("km-resnet", CIFAR, num_modules=1, blocks_per_module=1)
    assert backbone.stem[0].out_channels == 256
    assert backbone.blocks[0].conv1.out_channels == 512  # K*M = 1: block 0 is the midpoint


@pytest.mark.parametrize(
    ("size", "residual_indices", "final_side"),
    [(32, [5, 6, 9, 10, 12, 13, 14], 1), (28, [5, 6, 9, 10, 12, 13, 14, 15], 1)],
)
def test_vgg_residual_compatible_layers(
    size: int, residual_indices: list[int], final_side: int
) -> None:
    torch.manual_seed(0)
    backbone = build_backbone("vgg19", InputSpec(3, size, 10), num_modules=2, width=8)
    assert [i for i, b in enumerate(backbone.blocks) if b.has_residue] == residual_indices
    h = torch.randn(2, 3, size, size)
    for block in backbone.blocks:
        assert isinstance(block, VGGLayer)
        out, residues = block(h)
        if block.has_residue:
            assert out.shape == h.shape
            torch.testing.assert_close(residues[0], out - h)
        else:
            assert residues == []
            assert out.shape != h.shape
        h = out
    assert h.shape[-1] == final_side


@pytest.mark.parametrize(("size", "window"), [(224, 7), (96, 6), (64, 4), (32, 4), (28, 7)])
def test_swin_window_divides_the_patch_grid(size: int, window: int) -> None:
    assert window_for(size) == window


def test_swin_blocks_return_two_residues_that_rebuild_the_output() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("swin-tiny", InputSpec(3, 64, 10), num_modules=2, width=24)
    assert backbone.layout == "NHWC" and not backbone.init
    kinds = [type(b).__name__ for b in backbone.blocks]
    assert kinds.count("SwinBlock") == 12 and kinds.count("PatchMergingBlock") == 3
    backbone.stem.eval()
    h = backbone.stem(torch.randn(2, 3, 64, 64))
    assert h.shape == (2, 16, 16, 24)  # channels-last
    for block in backbone.blocks:
        block.eval()  # drop-path off, so timm's own forward is deterministic
        out, residues = block(h)
        if isinstance(block, SwinBlock):
            r_attn, r_mlp = residues
            torch.testing.assert_close(out, h + r_attn + r_mlp)
            torch.testing.assert_close(out, block.block(h))  # the same numbers as timm
            assert block.has_residue
        else:
            assert isinstance(block, PatchMergingBlock) and not block.has_residue
            assert residues == []
        h = out
    assert h.shape == (2, 2, 2, 192)


def test_swin_width_must_divide_among_heads() -> None:
    with pytest.raises(ValueError, match="multiple of 3"):
        build_backbone("swin-tiny", CIFAR, num_modules=2, width=32)


def test_swin_without_timm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ValueError, match="pip install timm"):
        build_backbone("swin-tiny", CIFAR, num_modules=2)


#: ResNet-101/152 differ from ResNet-50 only in depth: they run at one size per stem kind.
DEEP_BOTTLENECK_SPECS = [InputSpec(3, 32, 10), InputSpec(3, 224, 1000)]
MODEL_SPECS = [
    (name, spec)
    for name in MODEL_NAMES
    for spec in (DEEP_BOTTLENECK_SPECS if name in ("resnet101", "resnet152") else INPUT_SPECS)
]


@pytest.mark.parametrize(
    ("name", "spec"), MODEL_SPECS, ids=[f"{n}-{s.channels}x{s.size}" for n, s in MODEL_SPECS]
)
def test_every_model_trains_locally_at_every_input_size(name: str, spec: InputSpec) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name, spec, num_modules=2, width=TEST_WIDTHS[name])
    modules = build_modules(backbone, equal_depth(len(backbone.blocks), 2), spec)
    x, y = torch.randn(2, spec.channels, spec.size, spec.size), torch.tensor([0, 1])
    for module in modules:
        out = module(x.detach())  # the input is detached: only the local loss trains it
        assert out.logits.shape == (2, spec.num_classes)
        blocks = [b for b in module.body if isinstance(b, Block)]
        expected = sum(2 if isinstance(b, SwinBlock) else int(b.has_residue) for b in blocks)
        assert len(out.residues) == expected
        loss = local_loss(out.logits, y, out.residues, method="trgl", tau=1.0)
        loss.total.backward()
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads if g is not None)
        x = out.h
