"""What the single-process regimes share: the context, batches, test-set scoring, logging."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from trgl_dist.config import Config, planned_epochs
from trgl_dist.data import IndexedImages, make_loader, steps_per_epoch
from trgl_dist.training.learner import ModuleLearner

log = logging.getLogger(__name__)
Record = Callable[[dict[str, Any]], None]


@dataclass
class Context:
    """Everything a regime needs; records go to ``record`` (the run log)."""

    config: Config
    learners: list[ModuleLearner]
    train_set: IndexedImages
    test_set: IndexedImages
    device: torch.device
    record: Record
    samples_seen: int = 0
    epoch_times: list[float] = field(default_factory=list)
    # save(step, position): writes a checkpoint; position is what a resumed run needs
    save: Callable[[int, dict[str, Any]], None] = lambda step, position: None
    position: dict[str, Any] = field(default_factory=dict)  # restored from a checkpoint

    @property
    def max_steps(self) -> int:
        return self.config.train.max_steps

    def out_of_steps(self, learner: ModuleLearner) -> bool:
        return 0 < self.max_steps <= learner.steps


def batches(
    ctx: Context, epoch: int, desc: str, skip: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """Training batches of one epoch on the device, with a progress bar on a terminal."""
    d = ctx.config.data
    loader = make_loader(
        ctx.train_set,
        d.batch_size,
        train=True,
        seed=ctx.config.train.seed,
        epoch=epoch,
        workers=d.workers,
        skip_batches=skip,
    )
    bar = tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty(), unit="batch")
    for x, y, _ids in bar:
        ctx.samples_seen += len(y)
        yield x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)


@torch.no_grad()
def evaluate(
    ctx: Context, epoch: int, upto: int | None = None, only: Sequence[int] | None = None
) -> list[float]:
    """Score every module's head (or those in ``only``) on the test set; record them."""
    learners = ctx.learners[: upto if upto is not None else len(ctx.learners)]
    correct = [torch.zeros((), device=ctx.device) for _ in learners]
    ce = [torch.zeros((), device=ctx.device) for _ in learners]
    loader = make_loader(
        ctx.test_set,
        2 * ctx.config.data.batch_size,
        train=False,
        seed=ctx.config.train.seed,
        epoch=0,
        workers=ctx.config.data.workers,
    )
    total = 0
    for x, y, _ids in loader:
        h, y = x.to(ctx.device), y.to(ctx.device)
        for k, learner in enumerate(learners):
            h, right, loss = learner.eval_step(h, y)
            correct[k] += right
            ce[k] += loss
        total += len(y)
    accuracies = []
    for k, learner in enumerate(learners):
        accuracy = correct[k].item() / max(total, 1)
        accuracies.append(accuracy)
        if only is None or k in only:
            ctx.record(
                {
                    "kind": "eval",
                    "step": learner.steps,
                    "epoch": epoch,
                    "module": k,
                    "accuracy": accuracy,
                    "loss": ce[k].item() / max(total, 1),
                    "samples": total,
                }
            )
    shown = [f"{k + 1}:{a:.3f}" for k, a in enumerate(accuracies) if only is None or k in only]
    log.info("epoch %d test accuracy by module  %s", epoch + 1, "  ".join(shown))
    return accuracies


def log_train(ctx: Context, learner: ModuleLearner, epoch: int) -> None:
    if learner.meter.steps == 0:
        return
    ctx.record(
        {
            "kind": "train",
            "step": learner.steps,
            "epoch": epoch,
            "module": learner.index,
            "stage": 0,
            **learner.log_fields(),
        }
    )


def end_epoch(ctx: Context, epoch: int, started: float, learners: Sequence[ModuleLearner]) -> None:
    """Flush the train meters, step the schedulers, record the epoch time."""
    seconds = time.perf_counter() - started
    ctx.epoch_times.append(seconds)
    for learner in learners:
        log_train(ctx, learner, epoch)
        learner.scheduler.step()
    step = max(learner.steps for learner in learners)
    ctx.record({"kind": "epoch", "step": step, "epoch": epoch, "seconds": seconds})


def run_epochs(
    ctx: Context,
    step: Callable[[Tensor, Tensor], None],
    trained: Sequence[ModuleLearner],
    scored: Sequence[int] | None = None,
) -> None:
    """Lock-step epochs (parallel, e2e): ``step`` trains on one batch; the last of ``trained``
    counts the steps. Checkpoints every --checkpoint-every steps and at each epoch end; a
    resumed run continues at exactly the batch after its checkpoint."""
    t = ctx.config.train
    counter = trained[-1]
    per_epoch = steps_per_epoch(ctx.train_set, ctx.config.data.batch_size)
    first_epoch, skip = divmod(counter.steps, per_epoch)
    for epoch in range(first_epoch, planned_epochs(t, per_epoch)):
        if ctx.out_of_steps(counter):
            break
        started = time.perf_counter()
        for x, y in batches(ctx, epoch, f"epoch {epoch + 1}", skip if epoch == first_epoch else 0):
            step(x, y)
            for learner in trained:
                if learner.steps % t.log_every == 0:
                    log_train(ctx, learner, epoch)
            if t.checkpoint_every and counter.steps % t.checkpoint_every == 0:
                ctx.save(counter.steps, {})
            if ctx.out_of_steps(counter):
                break
        end_epoch(ctx, epoch, started, trained)
        evaluate(ctx, epoch, only=scored)
        ctx.save(counter.steps, {})
