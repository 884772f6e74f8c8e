"""End-to-end back-propagation through all modules: the baseline."""

from __future__ import annotations

import time

from trgl_dist.learner import ModuleLearner, build_optimizer, build_scheduler
from trgl_dist.method import local_loss
from trgl_dist.regimes.common import Context, batches, end_epoch, evaluate, log_train


def train_e2e(ctx: Context) -> None:
    """One optimizer over every body and the last head; only the last head is scored.

    The loss is plain CE whatever --method says (the transport is still logged).
    """
    last: ModuleLearner = ctx.learners[-1]
    params = [p for learner in ctx.learners for p in learner.module.body.parameters()]
    params += list(last.module.head.parameters())
    optimizer = build_optimizer(params, ctx.config)
    for learner in ctx.learners:  # one optimizer drives them all
        learner.optimizer, learner.scheduler = (
            optimizer,
            build_scheduler(optimizer, ctx.config, ctx.config.train.epochs),
        )
    smoothing = ctx.config.method.label_smoothing
    for epoch in range(ctx.config.train.epochs):
        started = time.perf_counter()
        for x, y in batches(ctx, epoch, f"epoch {epoch + 1}"):
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
                raise FloatingPointError(
                    f"e2e: loss is {loss.total.item()} at step {last.steps + 1}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            optimizer.step()
            last.steps += 1
            last.meter.add(
                loss.total, loss.ce, loss.transport, (logits.detach().argmax(1) == y).sum(), len(y)
            )
            if last.steps % ctx.config.train.log_every == 0:
                log_train(ctx, last, epoch)
            if ctx.out_of_steps(last):
                break
        end_epoch(ctx, epoch, started, [last])
        evaluate(ctx, epoch, only=[len(ctx.learners) - 1])
        if ctx.out_of_steps(last):
            break
