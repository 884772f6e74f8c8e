"""The method's math: transport cost, tau schedules, multipliers and the local loss.

Pure functions on tensors. Every regime (one process or pipeline) calls these and
nothing else, so there is exactly one implementation of TRGL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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

    def update(self, ce: float) -> None:
        """Count one iteration; on every ``every``-th, move lambda by ``h * ce``."""
        self.iteration += 1
        if self.iteration % self.every == 0:
            self.value += self.h * ce

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
    """The local objective of one module.

    vanilla:      CE_ls
    trgl:         CE_ls + W / (2 tau)
    multipliers:  lambda * CE_ls + W
    The transport cost is always computed (it is logged for VanGL too) but only
    enters the gradient where the method uses it.
    """
    ce = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    transport = transport_cost(residues, transport_norm).to(ce.device)
    if method == "vanilla":
        total = ce
    elif method == "trgl":
        total = ce + transport / (2 * tau) if math.isfinite(tau) else ce
    elif method == "multipliers":
        total = multiplier * ce + transport
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return LocalLoss(total=total, ce=ce.detach(), transport=transport.detach())
