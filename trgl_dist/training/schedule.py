"""The batch schedule every regime follows: each epoch's training batches, its test pass, END.

Stage 0 of the pipeline and the one-process lock-step regimes draw the same stream, so a
pipeline with FIFO buffers replays exactly the lock-step run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from trgl_dist.config import Config, planned_epochs, scores_after
from trgl_dist.data import EpochLoader, IndexedImages, loader_workers, steps_per_epoch
from trgl_dist.training.items import Batch, Kind
from trgl_dist.training.stage import StagePlan

CPU = torch.device("cpu")


class Inbox(Protocol):
    def get(self) -> tuple[Batch, float]: ...


class DataFeed:
    """A run's two loaders, training and test, made once so their worker processes (if
    any) persist; pinned batches on GPU."""

    def __init__(
        self,
        config: Config,
        train_set: IndexedImages,
        test_set: IndexedImages,
        device: torch.device = CPU,
    ) -> None:
        d = config.data
        workers, pin = loader_workers(d.workers, device), device.type == "cuda"
        seed = config.train.seed
        self.train = EpochLoader(
            train_set, d.batch_size, train=True, seed=seed, workers=workers, pin_memory=pin
        )
        self.test = EpochLoader(
            test_set, 2 * d.batch_size, train=False, seed=seed, workers=workers, pin_memory=pin
        )
        self.steps_per_epoch = steps_per_epoch(train_set, d.batch_size)

    def train_batches(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        """The training batches (x, y, ids) of ``epoch``, from batch ``skip`` on."""
        return self.train.epoch(epoch, skip)

    def test_batches(self) -> Iterator[Any]:
        """The test (or validation) batches (x, y, ids), in a fixed order."""
        return self.test.epoch(0)


def stage_plan(config: Config, feed: DataFeed, start_step: int = 0) -> StagePlan:
    """When a stage following this schedule reports and checkpoints."""
    t = config.train
    return StagePlan(
        log_every=t.log_every,
        checkpoint_every=t.checkpoint_every,
        start_step=start_step,
        steps_per_epoch=feed.steps_per_epoch,
    )


def batch_stream(
    config: Config, feed: DataFeed, start_step: int = 0
) -> Iterator[tuple[Batch, float]]:
    """(batch, seconds spent producing it). Step numbers count training batches from 1.

    ``start_step`` > 0 continues a resumed run at exactly the batch after that step.
    """
    t = config.train
    step = start_step
    per_epoch = feed.steps_per_epoch
    first_epoch, skip = divmod(start_step, per_epoch)
    last_epoch = final_epoch(config, per_epoch)
    epoch = first_epoch
    for epoch in range(first_epoch, last_epoch + 1):
        if 0 < t.max_steps <= step:  # resumed from the run's last step
            break
        batches = feed.train_batches(epoch, skip if epoch == first_epoch else 0)
        for (x, y, ids), waited in _timed(batches):
            step += 1
            yield Batch(Kind.TRAIN, step, epoch, x, y, ids), waited
            if 0 < t.max_steps <= step:
                break
        if scores_after(t, epoch, last_epoch):
            for (x, y, ids), waited in _timed(feed.test_batches()):
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
