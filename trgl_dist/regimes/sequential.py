"""Sequential and multi-lap training: one module at a time on its frozen predecessors' outputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from trgl_dist.config import module_epochs, scores_after
from trgl_dist.metrics.records import EpochRecord, EvalTally, TrainRecord
from trgl_dist.regimes.common import Context
from trgl_dist.training.learner import ModuleLearner
from trgl_dist.training.stage import score_batch

log = logging.getLogger(__name__)


def lap_epochs(total: int, laps: int) -> list[int]:
    """Split one module's epoch budget over laps; earlier laps take the remainder."""
    base, extra = divmod(total, laps)
    return [base + (1 if lap < extra else 0) for lap in range(laps)]


@torch.no_grad()
def frozen_forward(frozen: Sequence[ModuleLearner], x: Tensor) -> Tensor:
    """The predecessors in eval mode without grad: their weights and BN statistics do not move."""
    for learner in frozen:
        learner.module.eval()
        x = learner.module.features(x)[0]
    return x


def _on_device(ctx: Context, loader: Iterable[Sequence[Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    for x, y, _ids in loader:
        yield x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)


def cached_inputs(
    ctx: Context, frozen: Sequence[ModuleLearner], epoch: int
) -> tuple[Tensor, Tensor]:
    """One pass of the frozen prefix over the training set, kept in memory.

    The augmentation is therefore drawn once per sample, not once per epoch.
    """
    hs, ys = [], []
    for x, y in _on_device(ctx, ctx.feed.train_batches(epoch)):
        hs.append(frozen_forward(frozen, x).cpu())
        ys.append(y.cpu())
    h = torch.cat(hs)
    log.info("cached %d frozen outputs (%.0f MB)", len(h), h.numel() * h.element_size() / 2**20)
    return h, torch.cat(ys)


def _module_batches(
    ctx: Context, frozen: Sequence[ModuleLearner], epoch: int, cache: tuple[Tensor, Tensor] | None
) -> Iterator[tuple[Tensor, Tensor]]:
    if cache is None:
        for x, y in _on_device(ctx, ctx.feed.train_batches(epoch)):
            yield frozen_forward(frozen, x), y
        return
    h, y = cache
    g = torch.Generator().manual_seed(ctx.config.train.seed * 100_003 + epoch)
    order = torch.randperm(len(y), generator=g)
    for chunk in order.split(ctx.config.data.batch_size):
        yield h[chunk].to(ctx.device), y[chunk].to(ctx.device)


def train_sequential(ctx: Context) -> None:
    """sequential: module k trains N_k epochs, then freezes. multilap: R laps of N_k/R epochs each,
    the optimizer state carried from lap to lap. Same total budget either way.

    A checkpoint follows every module epoch; a resumed run skips the epochs already done
    (work since the last module epoch is redone)."""
    config = ctx.config
    laps = config.train.laps if config.train.regime == "multilap" else 1
    budgets = module_epochs(config.train, len(ctx.learners), ctx.feed.steps_per_epoch)
    schedule = [lap_epochs(n, laps) for n in budgets]
    done = list(ctx.position.get("epochs_done", [0] * len(ctx.learners)))  # epochs per module
    use_cache = config.train.cache_frozen and laps == 1
    for lap in range(laps):
        for k, learner in enumerate(ctx.learners):
            target = sum(schedule[k][: lap + 1])
            if done[k] >= target:
                continue
            frozen = ctx.learners[:k]
            cache = cached_inputs(ctx, frozen, done[k]) if use_cache and k > 0 else None
            while done[k] < target and not ctx.out_of_steps(learner):
                _module_epoch(ctx, learner, frozen, done[k], cache, budgets[k] - 1)
                done[k] += 1
                learner.guard.check(learner.index)
                ctx.save(sum(lr.steps for lr in ctx.learners), {"epochs_done": list(done)})


def _module_epoch(
    ctx: Context,
    learner: ModuleLearner,
    frozen: Sequence[ModuleLearner],
    epoch: int,
    cache: tuple[Tensor, Tensor] | None,
    last_epoch: int,
) -> None:
    """One epoch of ``learner`` on its frozen predecessors' outputs; its test score after
    the epochs --eval-every asks for and after its last one."""
    started = time.perf_counter()
    for h, y in _module_batches(ctx, frozen, epoch, cache):
        learner.train_step(h, y)
        if learner.steps % ctx.config.train.log_every == 0:
            _record_train(ctx, learner, epoch)
        if ctx.out_of_steps(learner):
            break
    _record_train(ctx, learner, epoch)
    learner.scheduler.step()
    seconds = time.perf_counter() - started
    ctx.record(EpochRecord(step=learner.steps, epoch=epoch, stage=0, seconds=seconds))
    if scores_after(ctx.config.train, epoch, last_epoch) or ctx.out_of_steps(learner):
        _score(ctx, [*frozen, learner], epoch)


def _record_train(ctx: Context, learner: ModuleLearner, epoch: int) -> None:
    learner.guard.check(learner.index)
    if learner.meter.steps == 0:
        return
    ctx.record(
        TrainRecord(
            step=learner.steps, epoch=epoch, module=learner.index, stage=0, **learner.log_fields()
        )
    )


def _score(ctx: Context, learners: Sequence[ModuleLearner], epoch: int) -> None:
    """The test score of the last of ``learners`` (the one just trained)."""
    last = len(learners) - 1
    tally = EvalTally([learners[last].index], epoch)
    for x, y in _on_device(ctx, ctx.feed.test_batches()):
        score_batch(learners, [last], tally, x, y)
    for rec in tally.records([learners[last].steps], stage=0):
        ctx.record(rec)
