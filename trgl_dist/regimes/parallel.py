"""The lock-step reference: per batch, each module forward, local backward and step in turn."""

from __future__ import annotations

import time

from trgl_dist.regimes.common import Context, batches, end_epoch, evaluate, log_train


def train_parallel(ctx: Context) -> None:
    """Module k+1 receives module k's output of the same batch, computed before k's update."""
    every = ctx.config.train.log_every
    for epoch in range(ctx.config.train.epochs):
        started = time.perf_counter()
        for x, y in batches(ctx, epoch, f"epoch {epoch + 1}"):
            h = x
            for learner in ctx.learners:
                h = learner.train_step(h, y)
                if learner.steps % every == 0:
                    log_train(ctx, learner, epoch)
            if ctx.out_of_steps(ctx.learners[-1]):
                break
        end_epoch(ctx, epoch, started, ctx.learners)
        evaluate(ctx, epoch)
        if ctx.out_of_steps(ctx.learners[-1]):
            break
