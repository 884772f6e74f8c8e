"""The batch schedule every regime follows: each epoch's training batches, its test pass, END.

Stage 0 of the pipeline and the one-process lock-step regimes draw the same stream, so a
pipeline with FIFO buffers replays exactly the lock-step run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Protocol

from torch.utils.data import DataLoader

from trgl_dist.config import Config, planned_epochs, scores_after
from trgl_dist.data import IndexedImages, make_loader, steps_per_epoch
from trgl_dist.training.items import Batch, Kind
from trgl_dist.training.stage import StagePlan


class Inbox(Protocol):
    def get(self) -> tuple[Batch, float]: ...


def stage_plan(config: Config, train_set: IndexedImages, start_step: int = 0) -> StagePlan:
    """When a stage following this schedule reports and checkpoints."""
    t = config.train
    return StagePlan(
        log_every=t.log_every,
        checkpoint_every=t.checkpoint_every,
        start_step=start_step,
        steps_per_epoch=steps_per_epoch(train_set, config.data.batch_size),
    )


def train_loader(config: Config, train_set: IndexedImages, epoch: int, skip: int = 0) -> DataLoader:
    """The training batches (x, y, ids) of ``epoch``, from batch ``skip`` on (a resumed run)."""
    d = config.data
    return make_loader(
        train_set,
        d.batch_size,
        train=True,
        seed=config.train.seed,
        epoch=epoch,
        workers=d.workers,
        skip_batches=skip,
    )


def test_loader(config: Config, test_set: IndexedImages) -> DataLoader:
    """The test (or validation) batches (x, y, ids), in a fixed order, twice the train batch."""
    d = config.data
    return make_loader(
        test_set, 2 * d.batch_size, train=False, seed=config.train.seed, epoch=0, workers=d.workers
    )


def batch_stream(
    config: Config, train_set: IndexedImages, test_set: IndexedImages, start_step: int = 0
) -> Iterator[tuple[Batch, float]]:
    """(batch, seconds spent producing it). Step numbers count training batches from 1.

    ``start_step`` > 0 continues a resumed run at exactly the batch after that step.
    """
    t = config.train
    step = start_step
    per_epoch = steps_per_epoch(train_set, config.data.batch_size)
    first_epoch, skip = divmod(start_step, per_epoch)
    last_epoch = final_epoch(config, per_epoch)
    epoch = first_epoch
    for epoch in range(first_epoch, last_epoch + 1):
        if 0 < t.max_steps <= step:  # resumed from the run's last step
            break
        loader = train_loader(config, train_set, epoch, skip if epoch == first_epoch else 0)
        for (x, y, ids), waited in _timed(iter(loader)):
            step += 1
            yield Batch(Kind.TRAIN, step, epoch, x, y, ids), waited
            if 0 < t.max_steps <= step:
                break
        if scores_after(t, epoch, last_epoch):
            for (x, y, ids), waited in _timed(iter(test_loader(config, test_set))):
                yield Batch(Kind.EVAL, step, epoch, x, y, ids), waited
    yield Batch(Kind.END, step, epoch, None, None, None), 0.0


def final_epoch(config: Config, per_epoch: int) -> int:
    """The 0-based epoch the run ends in: the planned epochs, cut short by --max-steps."""
    last = planned_epochs(config.train, per_epoch) - 1
    if config.train.max_steps:
        last = min(last, (config.train.max_steps - 1) // per_epoch)
    return last


def _timed(items: Iterator[Any]) -> Iterator[tuple[Any, float]]:
    while True:
        started = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        yield item, time.perf_counter() - started


def inbox_stream(inbox: Inbox) -> Iterator[tuple[Batch, float]]:
    """A downstream stage's input: whatever arrives in its inbox."""
    while True:
        yield inbox.get()
