"""The literal TRGL local loss, ``W`` in the autograd graph: the baseline the package beats.

This is DESIGN.md's objective written out (``CE + W / (2 tau)``, ``lambda CE + W``), what
``trgl_dist.method.local_loss`` computed before it added the transport gradient by hooks.
Autograd runs the newest nodes first, so here the backward starts with the transport of
every block: MeanBackward (a full-size division of the expanded gradient) and PowBackward
(``2 * r``, then times it) per residue, all those residue-sized gradients kept until the
backward reaches each block. The overhead and memory benchmarks run it beside the package
to show what that costs; same value and gradients (tests/test_benchmarks_overhead.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from trgl_dist.method import LocalLoss, objective, transport_cost, transport_weight


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
    """Drop-in for ``trgl_dist.method.local_loss`` with ``W`` in the graph."""
    ce = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    transport = transport_cost(residues, transport_norm).to(ce.device)
    weight = transport_weight(method, tau)
    total = objective(ce, transport, method=method, weight=weight, multiplier=multiplier)
    return LocalLoss(total=total, ce=ce.detach(), transport=transport.detach())
