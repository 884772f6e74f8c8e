"""The batch schedule every regime follows: each epoch's training batches, its test pass, END.

Stage 0 of the pipeline and the one-process lock-step regimes draw the same stream, so a
pipeline with FIFO buffers replays exactly the lock-step run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from trgl_dist.config import Config, planned_epochs, scores_after
from trgl_dist.data import EpochLoader, IndexedImages, loader_workers, steps_per_epoch
from trgl_dist.training.items import Batch, Kind
from trgl_dist.training.stageplan import StagePlan

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
        self.test_batch_count = steps_per_epoch(test_set, 2 * d.batch_size)

    def train_batches(
        self, epoch: int, skip: int = 0, keep: Callable[[int], bool] | None = None
    ) -> Iterator[Any]:
        """The training batches (x, y, ids) of ``epoch``, from batch ``skip`` on; with
        ``keep``, only the batches k (0-based in the epoch) it takes."""
        return self.train.epoch(epoch, skip, keep)

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
        final_step=final_step(config, feed.steps_per_epoch),
    )


@dataclass(frozen=True)
class Slot:
    """One item of the schedule before any data: its kind, step and epoch."""

    kind: Kind
    step: int
    epoch: int


def skeleton(
    config: Config, steps_per_epoch: int, test_batches: int, start_step: int = 0
) -> Iterator[Slot]:
    """The schedule's items in order, without data: every rank can tell what comes next.

    Each epoch's training steps (numbered from 1 across epochs), then its test pass (when
    --eval-every asks for one; always after the last epoch), then END. ``start_step`` > 0
    continues a resumed run at exactly the step after it.
    """
    t = config.train
    step = start_step
    first_epoch = start_step // steps_per_epoch
    last_epoch = final_epoch(config, steps_per_epoch)
    epoch = first_epoch
    for epoch in range(first_epoch, last_epoch + 1):
        if 0 < t.max_steps <= step:  # resumed from the run's last step
            break
        for _ in range(step - epoch * steps_per_epoch, steps_per_epoch):
            step += 1
            yield Slot(Kind.TRAIN, step, epoch)
            if 0 < t.max_steps <= step:
                break
        if scores_after(t, epoch, last_epoch):
            for _ in range(test_batches):
                yield Slot(Kind.EVAL, step, epoch)
    yield Slot(Kind.END, step, epoch)


def batch_stream(
    config: Config, feed: DataFeed, start_step: int = 0, replica: int = 0, replicas: int = 1
) -> Iterator[tuple[Batch, float]]:
    """(batch, seconds spent producing it): the schedule with its data.

    A stage with ``replicas`` replicas shares the training batches: replica i draws (and
    loads) only the steps s with (s - 1) mod replicas = i; the test pass is replica 0's.
    """
    per_epoch = feed.steps_per_epoch
    train: Iterator[Any] = iter(())
    test: Iterator[Any] = iter(())
    epoch = previous = -1
    for slot in skeleton(config, per_epoch, feed.test_batch_count, start_step):
        if slot.kind == Kind.END:
            yield Batch(Kind.END, slot.step, slot.epoch, None, None, None), 0.0
            return
        if slot.kind == Kind.EVAL:
            if replica != 0:
                continue
            if previous != Kind.EVAL:
                test = feed.test_batches()
            source = test
        else:
            if (slot.step - 1) % replicas != replica:
                previous = slot.kind
                continue
            if slot.epoch != epoch:
                epoch = slot.epoch
                base = epoch * per_epoch

                def mine(k: int, base: int = base) -> bool:
                    return (base + k) % replicas == replica

                skip = start_step - base if start_step > base else 0
                train = feed.train_batches(epoch, skip, mine if replicas > 1 else None)
            source = train
        previous = slot.kind
        started = time.perf_counter()
        x, y, ids = next(source)
        yield Batch(slot.kind, slot.step, slot.epoch, x, y, ids), time.perf_counter() - started


def final_epoch(config: Config, per_epoch: int) -> int:
    """The 0-based epoch the run ends in: the planned epochs, cut short by --max-steps."""
    last = planned_epochs(config.train, per_epoch) - 1
    if config.train.max_steps:
        last = min(last, (config.train.max_steps - 1) // per_epoch)
    return last


def final_step(config: Config, per_epoch: int) -> int:
    """The run's last training step: the planned epochs', or --max-steps if sooner."""
    last = planned_epochs(config.train, per_epoch) * per_epoch
    return min(last, config.train.max_steps) if config.train.max_steps else last


def inbox_stream(inbox: Inbox) -> Iterator[tuple[Batch, float]]:
    """A downstream stage's input: whatever arrives in its inbox."""
    while True:
        yield inbox.get()
