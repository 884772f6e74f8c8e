"""The method's math: transport cost, tau schedules, multipliers and the local loss.

Pure functions on tensors. Every regime (one process or pipeline) calls these and
nothing else, so there is exactly one implementation of TRGL.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("vanilla", "trgl", "multipliers")
TRANSPORT_NORMS = ("mean", "sum")
TAU_SCHEDULES = ("midpoint-double", "constant", "list")


def transport_cost(residues: Sequence[Tensor], norm: str = "mean") -> Tensor:
    """W_k: the kinetic energy of a module's residues r_m(x_m), summed over its blocks.

    ``mean``: mean of r**2 over batch and all feature dimensions, per block (the
    normalization of the authors' code, which gives the published tau their meaning).
    ``sum``: per-sample squared L2 norm, averaged over the batch (the paper's equation).
    """
    if norm not in TRANSPORT_NORMS:
        raise ValueError(f"transport norm must be one of {TRANSPORT_NORMS}, got {norm!r}")
    if not residues:
        return torch.zeros(())
    if norm == "mean":
        terms = [r.pow(2).mean() for r in residues]
    else:
        terms = [r.pow(2).flatten(1).sum(dim=1).mean() for r in residues]
    return torch.stack(terms).sum()


def tau_schedule(
    num_modules: int, tau: float, kind: str = "midpoint-double", values: Sequence[float] = ()
) -> list[float]:
    """Per-module tau_k.

    ``midpoint-double``: tau/2 for the first floor(K/2) modules, tau for the rest.
    ``constant``: tau everywhere. ``list``: the explicit ``values``, one per module.
    """
    if num_modules < 1:
        raise ValueError(f"need at least one module, got {num_modules}")
    if kind == "constant":
        return [float(tau)] * num_modules
    if kind == "midpoint-double":
        half = num_modules // 2
        return [tau / 2] * half + [float(tau)] * (num_modules - half)
    if kind == "list":
        if len(values) != num_modules:
            raise ValueError(f"tau list has {len(values)} values for {num_modules} modules")
        return [float(v) for v in values]
    raise ValueError(f"tau schedule must be one of {TAU_SCHEDULES}, got {kind!r}")


@dataclass
class Multiplier:
    """The adaptive weight of one module (method of multipliers).

    Loss at iteration i is ``lambda_i * CE + W``; every ``every`` iterations
    ``lambda <- lambda + h * CE`` with the detached CE of that iteration.
    """

    h: float
    every: int
    value: float
    iteration: int = field(default=0)

    def update(self, ce: float | Tensor) -> None:
        """Count one iteration; on every ``every``-th, move lambda by ``h * ce``.

        ``ce`` may be a device tensor: it is read only on the iterations that use it.
        """
        self.iteration += 1
        if self.iteration % self.every == 0:
            self.value += self.h * float(ce)

    def state_dict(self) -> dict[str, float | int]:
        return {"h": self.h, "every": self.every, "value": self.value, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.h, self.every = float(state["h"]), int(state["every"])
        self.value, self.iteration = float(state["value"]), int(state["iteration"])


@dataclass(frozen=True)
class LocalLoss:
    """A module's objective on one batch, with its parts for logging."""

    total: Tensor
    ce: Tensor
    transport: Tensor


def transport_weight(method: str, tau: float = math.inf) -> float:
    """d total / d W: 0 for VanGL (and TRGL with an infinite tau), 1 / (2 tau) for TRGL,
    1 for the multipliers."""
    if method == "trgl":
        return 1 / (2 * tau) if math.isfinite(tau) else 0.0
    if method == "multipliers":
        return 1.0
    if method == "vanilla":
        return 0.0
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def add_transport_gradient(residues: Sequence[Tensor], weight: float, norm: str = "mean") -> None:
    """Make the next backward through each residue add ``weight * dW/dr = weight * 2 r / n``
    to its gradient (n: the element count for ``mean``, the batch size for ``sum``).

    Why a hook and not ``W`` in the graph: autograd runs the newest nodes first, so a ``W``
    built after the forward would be differentiated before anything else, every block's
    ``2 r / n`` at once, each kept until the backward reaches its block. The hook adds it
    when the backward reaches the block, in one fused pass, one residue-sized buffer at a
    time. It fires once and then lets go of the residue.
    """
    if norm not in TRANSPORT_NORMS:
        raise ValueError(f"transport norm must be one of {TRANSPORT_NORMS}, got {norm!r}")
    for r in residues:
        if not r.requires_grad:
            continue
        divisor = r.numel() if norm == "mean" else r.shape[0]
        r.register_hook(_transport_hook(r.detach(), 2.0 * weight / divisor))


def _transport_hook(r: Tensor, alpha: float) -> Callable[[Tensor], Tensor]:
    held = [r]  # a detached alias, so no reference cycle through r's grad_fn

    def hook(grad: Tensor) -> Tensor:
        return grad.add(held.pop(), alpha=alpha) if held else grad

    return hook


def objective(
    ce: Tensor, transport: Tensor, *, method: str, weight: float, multiplier: float = 1.0
) -> Tensor:
    """``lambda * CE + W`` for the multipliers, ``CE + weight * W`` otherwise (``weight`` from
    ``transport_weight``; no W term at weight 0)."""
    scaled = multiplier * ce if method == "multipliers" else ce
    return scaled + weight * transport if weight else scaled


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
    literal: bool = False,
    grad_scale: float = 1.0,
) -> LocalLoss:
    """The local objective of one module; ``total.backward()`` (once) gives its gradients.

    vanilla:      CE_ls
    trgl:         CE_ls + W / (2 tau)
    multipliers:  lambda * CE_ls + W
    ``total`` has this value, but only its CE part is in the autograd graph: the gradient
    of the transport term reaches the residues through ``add_transport_gradient``. The
    transport cost is always computed (it is logged for VanGL too).

    ``literal=True`` (``literal_local_loss``) puts ``W`` in the graph instead: same value
    and gradients, at a cost. Autograd runs the newest nodes first, so that backward starts
    with every block's transport term, each block's ``2 r / n`` kept until the backward
    reaches the block. The benchmarks run it beside the hooks to show what they save.

    ``grad_scale``: the caller back-propagates ``total * grad_scale`` (a batch of an
    accumulated step); the transport gradient added by the hooks is scaled alike.
    """
    ce = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    weight = transport_weight(method, tau)
    with torch.set_grad_enabled(literal and torch.is_grad_enabled()):
        transport = transport_cost(residues, transport_norm).to(ce.device)
    if weight and not literal:
        add_transport_gradient(residues, weight * grad_scale, transport_norm)
    total = objective(ce, transport, method=method, weight=weight, multiplier=multiplier)
    return LocalLoss(total=total, ce=ce.detach(), transport=transport.detach())


#: The objective with ``W`` in the autograd graph: ``ModuleLearner(loss_fn=literal_local_loss)``.
literal_local_loss = functools.partial(local_loss, literal=True)
