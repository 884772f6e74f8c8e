"""Prototype of a cheaper TRGL local loss, proposed for ``trgl_dist/method.py``.

The package builds ``W = sum_m mean(r_m ** 2)`` into the autograd graph after the whole
forward pass. Autograd runs the most recently created nodes first, so the backward
starts with the transport of every block: MeanBackward (a full-size division of the
expanded gradient) and PowBackward (``2 * r``, then times it) per residue, and holds all
those residue-sized gradients until the backward reaches each block. That costs time
(several full-size passes per block) and memory (the sum of the module's residues).

Here W is computed without a graph (its value is still logged and part of ``total``),
and its gradient ``weight * 2 r / n`` is added by a hook on each residue, which fires
when the backward reaches that block: one fused pass, one residue-sized buffer at a time.
Same loss value, same gradients (checked by tests/test_benchmarks_overhead.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from trgl_dist.method import METHODS, LocalLoss, transport_cost


def transport_weight(method: str, tau: float) -> float:
    """d total / d W: 0 for VanGL, 1 / (2 tau) for TRGL, 1 for the multipliers."""
    if method == "trgl":
        return 1 / (2 * tau) if math.isfinite(tau) else 0.0
    if method == "multipliers":
        return 1.0
    if method == "vanilla":
        return 0.0
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def add_transport_gradient(residues: Sequence[Tensor], weight: float, norm: str) -> None:
    """Add ``weight * dW/dr`` to each residue's gradient when the backward reaches it."""
    for r in residues:
        if not r.requires_grad:
            continue
        divisor = r.numel() if norm == "mean" else r.shape[0]
        # The hook holds a detached alias: no reference cycle through r's grad_fn.
        alias, alpha = r.detach(), 2.0 * weight / divisor
        r.register_hook(lambda grad, alias=alias, alpha=alpha: grad.add(alias, alpha=alpha))


def local_loss(
    logits: Tensor,
    targets: Tensor,
    residues: Sequence[Tensor],
    *,
    method: str,
    tau: float = math.inf,
    multiplier: float = 1.0,
    transport_norm: str = "mean",
    label_smoothing: float = 0.1,
) -> LocalLoss:
    """Drop-in for ``trgl_dist.method.local_loss``: same value, same gradients."""
    ce = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    with torch.no_grad():
        transport = transport_cost(residues, transport_norm).to(ce.device)
    weight = transport_weight(method, tau)
    if weight:
        add_transport_gradient(residues, weight, transport_norm)
    scale = multiplier if method == "multipliers" else 1.0
    total = scale * ce + weight * transport if weight else ce
    return LocalLoss(total=total, ce=ce.detach(), transport=transport)
