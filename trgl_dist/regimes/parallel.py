"""The lock-step reference: per batch, each module forward, local backward and step in turn."""

from __future__ import annotations

from torch import Tensor

from trgl_dist.regimes.common import Context, run_epochs


def train_parallel(ctx: Context) -> None:
    """Module k+1 receives module k's output of the same batch, computed before k's update."""

    def step(x: Tensor, y: Tensor) -> None:
        h = x
        for learner in ctx.learners:
            h = learner.train_step(h, y)

    run_epochs(ctx, step, ctx.learners)
