"""Prototype of a cheaper transport cost: one fused backward pass per residue.

``trgl_dist.method.transport_cost`` takes ``r.pow(2).mean()`` per block. Its backward runs
MeanBackward (a full-size division of the expanded gradient) then PowBackward (``2 * r``,
then times that gradient): three full-size passes and allocations per residue, each as
large as the block's output. ``SquaredMean`` returns the same value and, in backward,
the gradient ``r * (2 * g / n)`` in one pass. Same forward value, same gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

TRANSPORT_NORMS = ("mean", "sum")


class SquaredMean(torch.autograd.Function):
    """sum(r**2) / divisor, with a one-pass backward."""

    @staticmethod
    def forward(ctx: Any, r: Tensor, divisor: float) -> Tensor:
        ctx.save_for_backward(r)
        ctx.divisor = divisor
        flat = r.reshape(-1)
        return torch.dot(flat, flat) / divisor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (r,) = ctx.saved_tensors
        return r * (grad * (2.0 / ctx.divisor)), None


def transport_cost(residues: Sequence[Tensor], norm: str = "mean") -> Tensor:
    """Drop-in for ``trgl_dist.method.transport_cost`` (same values and gradients)."""
    if norm not in TRANSPORT_NORMS:
        raise ValueError(f"transport norm must be one of {TRANSPORT_NORMS}, got {norm!r}")
    if not residues:
        return torch.zeros(())
    # mean: over every element; sum: per-sample squared norm averaged over the batch.
    terms = [
        SquaredMean.apply(r, float(r.numel() if norm == "mean" else r.shape[0])) for r in residues
    ]
    return torch.stack(terms).sum()
