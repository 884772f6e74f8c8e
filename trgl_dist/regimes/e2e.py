"""End-to-end back-propagation through all modules: the baseline."""

from __future__ import annotations

from torch import Tensor

from trgl_dist.method import local_loss
from trgl_dist.regimes.common import Context, run_epochs
from trgl_dist.training.learner import ModuleLearner


def train_e2e(ctx: Context) -> None:
    """One optimizer over every body and the last head; only the last head is scored.

    The loss is plain CE whatever --method says (the transport is still logged).
    """
    last: ModuleLearner = ctx.learners[-1]
    optimizer = last.optimizer  # shared by all modules: see share_optimizer
    smoothing = ctx.config.method.label_smoothing

    def step(x: Tensor, y: Tensor) -> None:
        h, residues = x, []
        for learner in ctx.learners:
            learner.module.train()
            h, block_residues = learner.module.features(h)
            residues += block_residues
        logits = last.module.head(h)
        loss = local_loss(
            logits,
            y,
            residues,
            method="vanilla",
            label_smoothing=smoothing,
            transport_norm=ctx.config.method.transport_norm,
        )
        if not loss.total.isfinite():
            raise FloatingPointError(f"e2e: loss is {loss.total.item()} at step {last.steps + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()
        last.steps += 1
        correct = (logits.detach().argmax(1) == y).sum()
        last.meter.add(loss.total, loss.ce, loss.transport, correct, len(y))

    run_epochs(ctx, step, [last], scored=[len(ctx.learners) - 1])

