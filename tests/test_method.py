"""The method's math on known tensors."""

import copy
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from trgl_dist.method import (
    Multiplier,
    literal_local_loss,
    local_loss,
    tau_schedule,
    transport_cost,
    transport_weight,
)
from trgl_dist.network.models import InputSpec, build_backbone
from trgl_dist.network.modules import build_modules


def residues():
    r1 = torch.arange(8, dtype=torch.float32).reshape(2, 1, 2, 2)  # samples [0..3], [4..7]
    r2 = torch.ones(2, 3) * 2.0
    return [r1, r2]


def test_transport_mean_is_per_block_mean_of_squares_summed():
    # block 1: (0+1+4+9+16+25+36+49)/8 = 140/8 = 17.5 ; block 2: 4
    assert transport_cost(residues(), "mean").item() == pytest.approx(17.5 + 4.0)


def test_transport_sum_is_batch_mean_of_per_sample_squared_norms():
    # block 1: sample norms 14 and 126 -> mean 70 ; block 2: 12 per sample -> 12
    assert transport_cost(residues(), "sum").item() == pytest.approx(70.0 + 12.0)


def test_transport_of_no_residue_is_zero_and_bad_norm_rejected():
    assert transport_cost([], "mean").item() == 0.0
    with pytest.raises(ValueError, match="norm"):
        transport_cost(residues(), "max")


@pytest.mark.parametrize(
    "k, expected",
    [
        (1, [1.0]),
        (2, [0.5, 1.0]),
        (3, [0.5, 1.0, 1.0]),
        (4, [0.5, 0.5, 1.0, 1.0]),
        (16, [0.5] * 8 + [1.0] * 8),
    ],
)
def test_midpoint_double_schedule(k, expected):
    assert tau_schedule(k, 1.0, "midpoint-double") == expected


def test_constant_and_list_schedules():
    assert tau_schedule(3, 0.3, "constant") == [0.3, 0.3, 0.3]
    assert tau_schedule(2, 9.0, "list", [0.1, 0.2]) == [0.1, 0.2]
    with pytest.raises(ValueError):
        tau_schedule(3, 1.0, "list", [0.1])
    with pytest.raises(ValueError):
        tau_schedule(0, 1.0)


def test_multiplier_fires_every_s_steps_with_the_given_loss():
    m = Multiplier(h=0.5, every=3, value=1.0)
    for ce in (10.0, 20.0):
        m.update(ce)
    assert m.value == 1.0
    m.update(4.0)  # third iteration: lambda += 0.5 * 4
    assert m.value == pytest.approx(3.0)
    for ce in (1.0, 1.0, 2.0):
        m.update(ce)
    assert m.value == pytest.approx(4.0)
    restored = Multiplier(0.0, 1, 0.0)
    restored.load_state_dict(m.state_dict())
    assert restored == m


def _logits():
    torch.manual_seed(0)
    return torch.randn(4, 5, requires_grad=True), torch.tensor([0, 1, 2, 3])


def test_local_loss_trgl_adds_w_over_two_tau():
    logits, y = _logits()
    ce = F.cross_entropy(logits, y, label_smoothing=0.1)
    out = local_loss(logits, y, residues(), method="trgl", tau=0.25)
    assert out.total.item() == pytest.approx(ce.item() + 21.5 / 0.5)
    assert out.ce.item() == pytest.approx(ce.item())
    assert out.transport.item() == pytest.approx(21.5)


def test_local_loss_vanilla_and_infinite_tau_are_plain_ce():
    logits, y = _logits()
    ce = F.cross_entropy(logits, y, label_smoothing=0.1).item()
    assert local_loss(logits, y, residues(), method="vanilla").total.item() == pytest.approx(ce)
    assert local_loss(
        logits, y, residues(), method="trgl", tau=math.inf
    ).total.item() == pytest.approx(ce)


def test_local_loss_multipliers_weights_ce():
    logits, y = _logits()
    ce = F.cross_entropy(logits, y, label_smoothing=0.0).item()
    out = local_loss(
        logits, y, residues(), method="multipliers", multiplier=3.0, label_smoothing=0.0
    )
    assert out.total.item() == pytest.approx(3.0 * ce + 21.5)


def test_transport_gradient_reaches_the_residue():
    r = torch.ones(2, 2, requires_grad=True)
    logits = r * 0.0 + torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # r feeds the head, CE-grad 0
    y = torch.tensor([0, 1])
    local_loss(logits, y, [r], method="trgl", tau=0.5).total.backward()
    # d/dr [mean(r^2) / (2*0.5)] = 2r / numel = 0.5
    assert torch.allclose(r.grad, torch.full((2, 2), 0.5))


def _literal_loss(logits, y, residues, method, tau, multiplier, norm):
    """The objective written out from its definition, with W in the autograd graph."""
    ce = F.cross_entropy(logits, y, label_smoothing=0.1)
    w = transport_cost(residues, norm)
    return {"vanilla": ce, "trgl": ce + w / (2 * tau), "multipliers": multiplier * ce + w}[method]


@pytest.mark.parametrize("method", ["vanilla", "trgl", "multipliers"])
@pytest.mark.parametrize("norm", ["mean", "sum"])
def test_local_loss_gradients_equal_the_literal_objective(method, norm):
    """The transport gradient added by hooks equals autograd's of ``CE + W / (2 tau)`` (and
    of ``lambda CE + W``), parameter by parameter, in float64 on a real module."""
    torch.manual_seed(0)
    spec = InputSpec(3, 8, 10)
    backbone = build_backbone("resnet-small", spec, num_modules=2, width=4)
    reference = build_modules(backbone, [5, 4], spec)[0].double()
    candidate = copy.deepcopy(reference)
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    out = reference(x)
    want = _literal_loss(out.logits, y, out.residues, method, 0.3, 1.7, norm)
    want.backward()
    for loss_fn in (local_loss, literal_local_loss):
        candidate.zero_grad(set_to_none=True)
        out = candidate(x)
        got = loss_fn(
            out.logits, y, out.residues, method=method, tau=0.3, multiplier=1.7,
            transport_norm=norm,
        )
        got.total.backward()
        torch.testing.assert_close(got.total, want.detach())
        for a, b in zip(candidate.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad)


def test_transport_weight_per_method():
    assert transport_weight("vanilla", 0.25) == 0.0
    assert transport_weight("trgl", 0.25) == 2.0
    assert transport_weight("trgl", math.inf) == 0.0
    assert transport_weight("multipliers", 0.25) == 1.0
    with pytest.raises(ValueError, match="method"):
        transport_weight("dgl")


def test_residues_are_freed_once_the_step_is_done():
    """The transport hooks let go of the residues: nothing keeps them alive after the
    backward once the module's output is dropped (no reference cycle)."""
    spec = InputSpec(3, 8, 10)
    module = build_modules(build_backbone("resnet-small", spec, num_modules=2, width=4), [5, 4],
                           spec)[0]  # fmt: skip
    out = module(torch.randn(6, 3, 8, 8))
    storages = [weakref.ref(r.untyped_storage()) for r in out.residues]
    loss = local_loss(out.logits, torch.randint(0, 10, (6,)), out.residues, method="trgl", tau=0.3)
    loss.total.backward()
    del out, loss
    assert all(ref() is None for ref in storages)
