"""One module with its own optimizer and local objective: the unit every regime trains."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trgl_dist.config import Config, default_lr
from trgl_dist.method import Multiplier, local_loss, tau_schedule
from trgl_dist.network.modules import LocalModule


@dataclass
class ModuleMeter:
    """Running sums of a module's step statistics, kept as tensors so logging never syncs a GPU."""

    loss: Tensor = field(default_factory=lambda: torch.zeros(()))
    ce: Tensor = field(default_factory=lambda: torch.zeros(()))
    transport: Tensor = field(default_factory=lambda: torch.zeros(()))
    correct: Tensor = field(default_factory=lambda: torch.zeros(()))
    samples: int = 0
    steps: int = 0

    def add(
        self, loss: Tensor, ce: Tensor, transport: Tensor, correct: Tensor, samples: int
    ) -> None:
        self.loss = self.loss.to(loss.device) + loss.detach()
        self.ce = self.ce.to(ce.device) + ce
        self.transport = self.transport.to(transport.device) + transport
        self.correct = self.correct.to(correct.device) + correct
        self.samples += samples
        self.steps += 1

    def flush(self) -> dict[str, float]:
        """Means since the last flush, then reset."""
        n = max(self.steps, 1)
        out = {
            "loss": self.loss.item() / n,
            "ce": self.ce.item() / n,
            "transport": self.transport.item() / n,
            "accuracy": self.correct.item() / max(self.samples, 1),
            "samples": self.samples,
        }
        self.__init__()  # type: ignore[misc]
        return out


def build_optimizer(params: Any, config: Config) -> torch.optim.Optimizer:
    o = config.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=default_lr(config), weight_decay=o.weight_decay or 0.05)
    return torch.optim.SGD(
        params, lr=default_lr(config), momentum=o.momentum, weight_decay=o.weight_decay
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: Config, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch. auto: e2e /5 at 120/160/200, AdamW cosine, else constant."""
    kind = config.optim.schedule
    if kind == "auto":
        kind = (
            "step"
            if config.train.regime == "e2e"
            else "cosine"
            if config.optim.optimizer == "adamw"
            else "constant"
        )
    if kind == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [120, 160, 200], gamma=0.2)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


class ModuleLearner:
    """Module k, its optimizer and its method state. ``train_step`` is the whole local update."""

    def __init__(
        self, index: int, module: LocalModule, config: Config, tau: float, epochs: int = 1
    ):
        self.index, self.module, self.config = index, module, config
        self.method = config.method
        self.tau = tau
        self.multiplier = (
            Multiplier(
                self.method.multiplier_h, self.method.multiplier_every, self.method.multiplier_init
            )
            if self.method.name == "multipliers"
            else None
        )
        self.optimizer = build_optimizer(module.parameters(), config)
        self.scheduler = build_scheduler(self.optimizer, config, epochs)
        self.meter = ModuleMeter()
        self.steps = 0

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward, local loss, backward, step. Returns the output computed before the update."""
        self.module.train()
        out = self.module(x.detach())
        loss = local_loss(
            out.logits,
            y,
            out.residues,
            method=self.method.name,
            tau=self.tau,
            multiplier=self.multiplier.value if self.multiplier else 1.0,
            transport_norm=self.method.transport_norm,
            label_smoothing=self.method.label_smoothing,
        )
        if not torch.isfinite(loss.total):
            raise FloatingPointError(
                f"module {self.index + 1}: loss is {loss.total.item()} at step {self.steps + 1}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        self.optimizer.step()
        if self.multiplier is not None:
            self.multiplier.update(loss.ce.item())
        self.steps += 1
        correct = (out.logits.detach().argmax(1) == y).sum()
        self.meter.add(loss.total, loss.ce, loss.transport, correct, len(y))
        return out.h.detach()

    @torch.no_grad()
    def eval_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eval-mode forward: (output, number correct, summed CE) for the test-set score."""
        self.module.eval()
        out = self.module(x)
        ce = nn.functional.cross_entropy(out.logits, y, reduction="sum")
        return out.h, (out.logits.argmax(1) == y).sum(), ce

    def log_fields(self) -> dict[str, Any]:
        """The interval means plus tau or lambda, for a "train" record."""
        fields: dict[str, Any] = self.meter.flush()
        fields["tau"] = self.tau if self.method.name == "trgl" and math.isfinite(self.tau) else None
        fields["lambda"] = self.multiplier.value if self.multiplier else None
        return fields

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps": self.steps,
            "multiplier": self.multiplier.state_dict() if self.multiplier else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = int(state["steps"])
        if self.multiplier is not None and state["multiplier"] is not None:
            self.multiplier.load_state_dict(state["multiplier"])


def build_learners(
    config: Config, modules: Sequence[LocalModule], indices: Sequence[int] | None = None
) -> list[ModuleLearner]:
    """Learners for ``modules[k]``, k in ``indices`` (all by default), with the tau schedule
    of the whole network. E2E shares one optimizer over everything (see share_optimizer)."""
    tau = taus(config, len(modules))
    chosen = range(len(modules)) if indices is None else indices
    learners = [ModuleLearner(k, modules[k], config, tau[k], config.train.epochs) for k in chosen]
    if config.train.regime == "e2e":
        share_optimizer(learners, config)
    return learners


def share_optimizer(learners: Sequence[ModuleLearner], config: Config) -> None:
    """E2E: one optimizer (and schedule) over every body and the last head, set on every
    learner so that checkpoints save and restore it like any other."""
    params = [p for learner in learners for p in learner.module.body.parameters()]
    params += list(learners[-1].module.head.parameters())
    optimizer = build_optimizer(params, config)
    scheduler = build_scheduler(optimizer, config, config.train.epochs)
    for learner in learners:
        learner.optimizer, learner.scheduler = optimizer, scheduler


def taus(config: Config, num_modules: int) -> list[float]:
    m = config.method
    return tau_schedule(num_modules, m.tau, m.tau_schedule, m.tau_values)
