"""The lock-step regimes, `parallel` and `e2e`: the pipeline's stage loop without links.

One stage holds every module and draws the schedule itself, so `parallel` is exactly what
a FIFO pipeline computes: module k+1 receives k's output of the same batch, computed before
k's update. `e2e` trains the same modules end to end on the same schedule.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from tqdm import tqdm

from trgl_dist.regimes.common import Context
from trgl_dist.training.items import Batch
from trgl_dist.training.learner import chain, end_to_end
from trgl_dist.training.schedule import batch_stream, stage_plan
from trgl_dist.training.stage import StageWorker


def train_lockstep(ctx: Context) -> None:
    """parallel: each module's local step in turn; e2e: back-propagation through them all,
    only the last head scored."""
    config = ctx.config
    e2e = config.train.regime == "e2e"
    worker = StageWorker(
        0,
        ctx.learners,
        _with_progress_bar(batch_stream(config, ctx.feed, ctx.start_step)),
        None,
        ctx.record,
        stage_plan(config, ctx.feed, ctx.start_step),
        device=ctx.device,
        trainer=end_to_end(ctx.learners) if e2e else chain(ctx.learners),
        scored=[len(ctx.learners) - 1] if e2e else None,
        save=lambda step, _epoch: ctx.save(step, {}),
    )
    worker.run()


def _with_progress_bar(stream: Iterator[tuple[Batch, float]]) -> Iterator[tuple[Batch, float]]:
    """A batch counter on a terminal; nothing when the output is a file or a pipe."""
    yield from tqdm(stream, leave=False, disable=not sys.stderr.isatty(), unit="batch")
