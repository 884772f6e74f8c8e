"""Stage 0's input: the training batches of every epoch, each epoch's test pass, then END."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from trgl_dist.config import Config, planned_epochs
from trgl_dist.data import IndexedImages, make_loader, steps_per_epoch
from trgl_dist.runtime.buffer import BatchBuffer
from trgl_dist.training.items import Batch, Kind


def batch_stream(
    config: Config, train_set: IndexedImages, test_set: IndexedImages, start_step: int = 0
) -> Iterator[tuple[Batch, float]]:
    """(batch, seconds spent producing it). Step numbers count training batches from 1.

    With the same seed this is exactly the batch sequence of the `parallel` regime.
    """
    d, t = config.data, config.train
    step = start_step
    per_epoch = steps_per_epoch(train_set, d.batch_size)
    first_epoch, skip = divmod(start_step, per_epoch)
    epoch = first_epoch
    for epoch in range(first_epoch, planned_epochs(t, per_epoch)):
        if 0 < t.max_steps <= step:
            break
        loader = make_loader(
            train_set,
            d.batch_size,
            train=True,
            seed=t.seed,
            epoch=epoch,
            workers=d.workers,
            skip_batches=skip if epoch == first_epoch else 0,
        )
        for batch, waited in _timed(iter(loader)):
            step += 1
            x, y, ids = batch
            yield Batch(Kind.TRAIN, step, epoch, x, y, ids), waited
            if 0 < t.max_steps <= step:
                break
        test = make_loader(
            test_set, 2 * d.batch_size, train=False, seed=t.seed, epoch=0, workers=d.workers
        )
        for (x, y, ids), waited in _timed(iter(test)):
            yield Batch(Kind.EVAL, step, epoch, x, y, ids), waited
    yield Batch(Kind.END, step, epoch, None, None, None), 0.0


def _timed(items: Iterator[Any]) -> Iterator[tuple[Any, float]]:
    while True:
        started = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        yield item, time.perf_counter() - started


def inbox_stream(inbox: BatchBuffer) -> Iterator[tuple[Batch, float]]:
    """A downstream stage's input: whatever arrives in its inbox."""
    while True:
        yield inbox.get()
