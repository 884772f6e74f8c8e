"""Local modules: assembly from a backbone, outputs, the paper's init and the cut model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trgl_dist.network.models import Backbone, InputSpec, build_backbone
from trgl_dist.network.modules import (
    CutModel,
    LocalModule,
    ModuleOutput,
    build_modules,
    init_weights,
)

FASHION = InputSpec(1, 28, 10)


def small_backbone() -> Backbone:
    torch.manual_seed(0)
    return build_backbone("resnet-small", FASHION, num_modules=3, width=8)


def test_modules_hold_the_stem_then_consecutive_blocks() -> None:
    backbone = small_backbone()
    modules = build_modules(backbone, [3, 2, 4], FASHION)
    assert len(modules) == 3
    assert modules[0].body[0] is backbone.stem
    bodies = [list(m.body) for m in modules]
    assert bodies[0][1:] == backbone.blocks[:3]
    assert bodies[1] == backbone.blocks[3:5]
    assert bodies[2] == backbone.blocks[5:]


def test_module_output_chains_and_collects_residues() -> None:
    modules = build_modules(small_backbone(), [4, 3, 2], FASHION)
    x = torch.randn(4, 1, 28, 28)
    out = modules[0](x)
    assert isinstance(out, ModuleOutput)
    assert out.h.shape == (4, 16, 14, 14)  # 4 blocks: stage 1 and the opening of stage 2
    assert len(out.residues) == 4 and out.logits.shape == (4, 10)
    h, residues = modules[0].features(x)
    torch.testing.assert_close(h, out.h)
    torch.testing.assert_close(modules[0].head(h), out.logits)
    assert all(torch.equal(a, b) for a, b in zip(residues, out.residues))
    second = modules[1](out.h)
    assert second.h.shape == (4, 32, 7, 7) and len(second.residues) == 3


def test_heads_fit_each_module_output() -> None:
    modules = build_modules(small_backbone(), [3, 3, 3], FASHION, head="linear")
    in_features = [m.head[-1].in_features for m in modules]
    assert in_features == [8, 16, 32]


def test_shape_probe_leaves_batchnorm_and_modes_alone() -> None:
    backbone = small_backbone()
    stats_before = backbone.blocks[0].bn1.running_mean.clone()
    modules = build_modules(backbone, [5, 4], FASHION)
    assert torch.equal(backbone.blocks[0].bn1.running_mean, stats_before)
    assert backbone.blocks[0].bn1.num_batches_tracked == 0
    assert all(layer.training for m in modules for layer in m.modules())


@pytest.mark.parametrize("counts", [[3, 2], [9, 0], [7], []])
def test_bad_counts_are_rejected(counts: list[int]) -> None:
    with pytest.raises(ValueError, match="sum to 9 blocks"):
        build_modules(small_backbone(), counts, FASHION)


def test_init_weights_is_the_papers() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 6, 3, bias=True),  # flattened 6 x 36: rows <= cols
        nn.BatchNorm2d(6),
        nn.Linear(8, 20),  # 20 x 8: rows > cols
    )
    nn.init.normal_(net[1].weight)
    nn.init.normal_(net[1].bias)
    init_weights(net)
    conv_w = net[0].weight.flatten(1)
    torch.testing.assert_close(conv_w @ conv_w.T, 0.01 * torch.eye(6), atol=1e-6, rtol=0)
    linear_w = net[2].weight
    torch.testing.assert_close(linear_w.T @ linear_w, 0.01 * torch.eye(8), atol=1e-6, rtol=0)
    assert torch.equal(net[0].bias, torch.zeros(6)) and torch.equal(net[2].bias, torch.zeros(20))
    assert torch.equal(net[1].weight, torch.ones(6)) and torch.equal(net[1].bias, torch.zeros(6))


def test_build_modules_applies_the_init() -> None:
    modules = build_modules(small_backbone(), [4, 5], FASHION)
    conv = modules[1].body[0].conv1
    w = conv.weight.flatten(1)  # 16 x 144
    torch.testing.assert_close(w @ w.T, 0.01 * torch.eye(16), atol=1e-6, rtol=0)
    head_conv = modules[0].head[0]
    w = head_conv.weight.flatten(1)
    torch.testing.assert_close(w @ w.T, 0.01 * torch.eye(16), atol=1e-6, rtol=0)


def test_swin_keeps_timms_init() -> None:
    spec = InputSpec(3, 32, 10)
    backbone = build_backbone("swin-tiny", spec, num_modules=2, width=24)
    before = {k: v.clone() for k, v in backbone.blocks[0].state_dict().items()}
    modules = build_modules(backbone, [8, 7], spec, head="linear")
    after = modules[0].body[1].state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_cut_model_equals_running_the_modules_by_hand(k: int) -> None:
    modules = build_modules(small_backbone(), [3, 3, 3], FASHION)
    for module in modules:
        module.eval()
    x = torch.randn(3, 1, 28, 28)
    h = x
    for module in modules[: k - 1]:
        h = module(h).h
    expected = modules[k - 1](h).logits
    cut = CutModel(modules[:k])
    torch.testing.assert_close(cut(x), expected)
    assert sum(p.numel() for p in cut.parameters()) == sum(
        p.numel() for m in modules[:k] for p in m.parameters()
    )


def test_cut_model_needs_a_module() -> None:
    with pytest.raises(ValueError, match="at least one"):
        CutModel([])


def test_local_module_from_parts() -> None:
    module = LocalModule([nn.Identity()], nn.Flatten())
    out = module(torch.ones(2, 3))
    assert torch.equal(out.h, torch.ones(2, 3)) and out.residues == []
