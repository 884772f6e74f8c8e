"""The method's math on known tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from trgl_dist.method import Multiplier, local_loss, tau_schedule, transport_cost


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
    logits, y = _logits()
    local_loss(logits, y, [r], method="trgl", tau=0.5).total.backward()
    # d/dr [mean(r^2) / (2*0.5)] = 2r / numel = 0.5
    assert torch.allclose(r.grad, torch.full((2, 2), 0.5))
