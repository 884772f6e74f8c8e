"""One module with its own optimizer and local objective: the unit every regime trains.

A training step is three parts, each usable alone: ``forward`` (the module on a detached
input), ``loss`` (the local objective, ``method.local_loss`` unless another is given) and
``apply`` (backward and optimizer step). Nothing in a step reads a value back to the host:
the meter and the finiteness guard stay on the device until the stage asks for them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trgl_dist.config import Config, default_lr
from trgl_dist.method import LocalLoss, Multiplier, local_loss, tau_schedule
from trgl_dist.metrics.spans import NullRecorder, Recorder
from trgl_dist.network.modules import LocalModule, ModuleOutput

LossFn = Callable[..., LocalLoss]


@dataclass
class ModuleMeter:
    """Running sums of a module's step statistics, kept as tensors so logging never syncs a GPU."""

    loss: Tensor = field(default_factory=lambda: torch.zeros(()))
    ce: Tensor = field(default_factory=lambda: torch.zeros(()))
    transport: Tensor = field(default_factory=lambda: torch.zeros(()))
    correct: Tensor = field(default_factory=lambda: torch.zeros(()))
    samples: int = 0
    steps: int = 0

    def add(self, loss: LocalLoss, correct: Tensor, samples: int) -> None:
        self.loss = self.loss.to(correct.device) + loss.total.detach()
        self.ce = self.ce.to(correct.device) + loss.ce
        self.transport = self.transport.to(correct.device) + loss.transport
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


class FiniteGuard:
    """Remembers, on the device, the first step whose loss was NaN or inf.

    Branching on the loss at every step would make the host wait for the device; the guard
    records instead, and ``check`` (at a log interval, before a checkpoint, at the end)
    raises for the step it saw, so a checkpoint is never written after a bad step.
    """

    def __init__(self) -> None:
        self.step = torch.zeros((), dtype=torch.int64)  # 0: every loss so far was finite
        self.value = torch.zeros(())

    def observe(self, total: Tensor, step: int) -> None:
        if self.step.device != total.device:
            self.step, self.value = self.step.to(total.device), self.value.to(total.device)
        first = (self.step == 0) & ~torch.isfinite(total.detach())
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, total.detach(), self.value)

    def check(self, module: int) -> None:
        """Raise FloatingPointError naming the module and the first bad step, if any."""
        step = int(self.step.item())
        if step:
            raise FloatingPointError(
                f"module {module + 1}: loss is {self.value.item()} at step {step}"
            )


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
        self,
        index: int,
        module: LocalModule,
        config: Config,
        tau: float,
        epochs: int = 1,
        loss_fn: LossFn = local_loss,
    ):
        self.index, self.module, self.config = index, module, config
        self.method = config.method
        self.tau = tau
        self.loss_fn = loss_fn
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
        self.guard = FiniteGuard()
        self.steps = 0
        # Gradients of ``accumulate`` batches make one optimizer step, each batch's weighed
        # by ``grad_scale``; ``reduce`` (stage replicas) sums them across the replicas first.
        self.accumulate = 1
        self.grad_scale = 1.0
        self.reduce: Callable[[ModuleLearner], None] | None = None
        self.in_window = 0  # batches since the last optimizer step
        # The epoch whose learning rate the next optimizer step takes: that of the last batch
        # of its window, which a replica may not see itself (see StagePlan.window_epoch).
        self.epoch = 0
        self.spans: Recorder = NullRecorder()  # a timeline of its steps, with --trace
        m = index + 1
        self._span_names = (f"forward m{m}", f"backward m{m}", f"step m{m}")

    def forward(self, x: Tensor) -> ModuleOutput:
        """The module in training mode on ``x``, detached: nothing flows back upstream."""
        self.module.train()
        return self.module(x.detach())

    def loss(self, logits: Tensor, y: Tensor, residues: Sequence[Tensor]) -> LocalLoss:
        """The local objective of this module's method on one batch."""
        return self.loss_fn(
            logits,
            y,
            residues,
            method=self.method.name,
            tau=self.tau,
            multiplier=self.multiplier.value if self.multiplier else 1.0,
            transport_norm=self.method.transport_norm,
            label_smoothing=self.method.label_smoothing,
            grad_scale=self.grad_scale,
        )

    def apply(self, loss: LocalLoss, logits: Tensor, y: Tensor) -> None:
        """Backward of ``loss``, and the optimizer step once a window of ``accumulate``
        batches is complete; counts the batch and meters it."""
        self.guard.observe(loss.total, self.steps + 1)
        if self.in_window == 0:
            self.optimizer.zero_grad(set_to_none=True)
        scaled = loss.total if self.grad_scale == 1.0 else loss.total * self.grad_scale
        with self.spans.span(self._span_names[1], "compute"):
            scaled.backward()
        self.in_window += 1
        if self.in_window == self.accumulate:
            self.update()
        if self.multiplier is not None:
            self.multiplier.update(loss.ce)
        self.steps += 1
        self.meter.add(loss, (logits.detach().argmax(1) == y).sum(), len(y))

    def update(self) -> None:
        """The optimizer step of the gradients gathered so far (summed across the stage's
        replicas first, when it has several)."""
        with self.spans.span(self._span_names[2], "compute"):
            if self.reduce is not None:
                with self.spans.span("all-reduce", "compute"):
                    self.reduce(self)
            self._schedule_to(self.epoch)
            self.optimizer.step()
        self.in_window = 0

    def _schedule_to(self, epoch: int) -> None:
        """Move the learning-rate schedule on to ``epoch`` (one step per epoch begun since);
        e2e's learners share one schedule, which moves once."""
        if self.scheduler.last_epoch >= epoch:
            return  # every step but the first of an epoch: nothing to move
        with warnings.catch_warnings():
            # A resumed run's first step moves the schedule before its first optimizer
            # step: torch warns, but the epoch did begin and the schedule must move on.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            while self.scheduler.last_epoch < epoch:
                self.scheduler.step()

    def sit_out_window(self) -> None:
        """A replica without a batch in the run's last, partial window: it adds zero
        gradients to the others' and steps with them, so every replica stays identical."""
        for p in self.module.parameters():
            p.grad = torch.zeros_like(p)
        self.update()

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward, local loss, backward, step. Returns the output computed before the update."""
        with self.spans.span(self._span_names[0], "compute"):
            out = self.forward(x)
            loss = self.loss(out.logits, y, out.residues)
        self.apply(loss, out.logits, y)
        return out.h.detach()

    @torch.no_grad()
    def eval_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eval-mode forward: (output, number correct, summed CE) for the test-set score."""
        self.module.eval()
        out = self.module(x)
        ce = nn.functional.cross_entropy(out.logits, y, reduction="sum")
        return out.h, (out.logits.argmax(1) == y).sum(), ce

    def log_fields(self) -> dict[str, Any]:
        """The interval means plus tau or lambda, the fields of a train record."""
        fields: dict[str, Any] = self.meter.flush()
        fields["tau"] = self.tau if self.method.name == "trgl" and math.isfinite(self.tau) else None
        fields["lambda_"] = self.multiplier.value if self.multiplier else None
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


Trainer = Callable[[Tensor, Tensor], Tensor]


def chain(learners: Sequence[ModuleLearner]) -> Trainer:
    """Module-wise training of consecutive modules: each trains on its predecessor's output,
    computed before the predecessor's update (the lock-step reference and a pipeline stage)."""

    def step(h: Tensor, y: Tensor) -> Tensor:
        for learner in learners:
            h = learner.train_step(h, y)
        return h

    return step


def end_to_end(learners: Sequence[ModuleLearner]) -> Trainer:
    """Back-propagation through every body into the last head, with plain CE whatever the
    method (the transport is still metered). One optimizer: see ``share_optimizer``."""
    last = learners[-1]

    def step(x: Tensor, y: Tensor) -> Tensor:
        h, residues = x, []
        for learner in learners:
            learner.module.train()
            h, block_residues = learner.module.features(h)
            residues += block_residues
        logits = last.module.head(h)
        m = last.method
        loss = local_loss(
            logits,
            y,
            residues,
            method="vanilla",
            label_smoothing=m.label_smoothing,
            transport_norm=m.transport_norm,
        )
        last.apply(loss, logits, y)
        return h.detach()

    return step


def build_learners(
    config: Config, modules: Sequence[LocalModule], indices: Sequence[int] | None = None
) -> list[ModuleLearner]:
    """Learners for ``modules[k]``, k in ``indices`` (all by default), with the tau schedule
    of the whole network. E2E shares one optimizer over everything (see share_optimizer)."""
    tau = taus(config, len(modules))
    chosen = range(len(modules)) if indices is None else indices
    learners = [ModuleLearner(k, modules[k], config, tau[k], config.train.epochs) for k in chosen]
    counts = config.train.accumulate
    for learner in learners:
        if counts:
            learner.accumulate = counts[learner.index] if len(counts) > 1 else counts[0]
            learner.grad_scale = 1.0 / learner.accumulate
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
