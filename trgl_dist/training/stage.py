"""The stage loop: take a batch, train (or score) this stage's modules on it, pass it on.

The same loop runs a pipeline stage (its input from the inbox, its output to the outbox)
and the one-process lock-step regimes (all modules, the schedule as input, no outbox).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from trgl_dist.metrics.records import (
    EndRecord,
    EpochRecord,
    EvalTally,
    Record,
    StageRecord,
    TrainRecord,
)
from trgl_dist.training.items import Batch, Kind
from trgl_dist.training.learner import ModuleLearner, Trainer, chain
from trgl_dist.training.memory import (
    MIB,
    cuda_peak_mb,
    peak_rss_mb,
    reset_cuda_peak,
    state_bytes,
)
from trgl_dist.training.timing import Timer, timer_for

log = logging.getLogger(__name__)
Send = Callable[[Record], Any]
SaveStage = Callable[[int, int], None]  # (step, epoch): write this stage's checkpoint of that step
STAGE_RECORD_SECONDS = 2.0
FORWARDED_MEMORY = 1024  # far more than any buffer holds, so a replayed step is always known


class Buffer(Protocol):
    """What the stage needs of its inbox and outbox (runtime.buffer.BatchBuffer is one)."""

    @property
    def depth(self) -> int: ...

    def put(self, batch: Batch) -> float: ...

    def stats(self) -> dict[str, Any]: ...


def stage_modules(num_modules: int, world_size: int, stage: int) -> range:
    """The contiguous modules of a stage; earlier stages take the remainder."""
    if world_size > num_modules:
        raise ValueError(
            f"more ranks ({world_size}) than modules ({num_modules}): "
            f"use --modules {world_size} or more, or fewer processes"
        )
    base, extra = divmod(num_modules, world_size)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def _on(device: torch.device, t: torch.Tensor) -> torch.Tensor:
    """``t`` on ``device``; from pinned memory the copy does not block the host."""
    return t.to(device, non_blocking=True)


def score_batch(
    learners: Sequence[ModuleLearner],
    scored: Sequence[int],
    tally: EvalTally,
    x: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """Eval-mode pass of ``learners`` on one test batch; the modules at positions ``scored``
    add to ``tally``. Returns the last module's output."""
    h = x
    for i, learner in enumerate(learners):
        h, correct, loss = learner.eval_step(h, y)
        if i in scored:
            tally.add(list(scored).index(i), correct, loss)
    tally.samples += len(y)
    return h


@dataclass(frozen=True)
class StagePlan:
    """When a stage reports and saves, and where a resumed one starts."""

    log_every: int = 20  # a train record per module every this many steps
    checkpoint_every: int = 0  # steps; 0: only at each epoch's end
    start_step: int = 0  # resumed: the checkpoint's step
    steps_per_epoch: int = 1


@dataclass
class StageClock:
    """Host time waiting for input and to pass output on (busy time is the timer's)."""

    wait_in: float = 0.0
    wait_out: float = 0.0
    samples: int = 0
    bytes_sent: int = 0
    started: float = field(default_factory=time.perf_counter)


class StageWorker:
    """Runs one stage until the END message; every module keeps its own optimizer.

    ``source`` yields this stage's input batches: the schedule on stage 0, the inbox
    otherwise. ``outbox`` is None on the last stage, whose output is dropped. ``trainer``
    trains the stage's modules on one batch (module-wise by default); ``scored`` are the
    positions, among ``learners``, of the modules whose test score is recorded (all by
    default).
    """

    def __init__(
        self,
        stage: int,
        learners: Sequence[ModuleLearner],
        source: Iterator[tuple[Batch, float]],
        outbox: Buffer | None,
        send: Send,
        plan: StagePlan,
        *,
        device: torch.device,
        rank: int | None = None,
        timer: Timer | None = None,
        trainer: Trainer | None = None,
        scored: Sequence[int] | None = None,
        inbox: Buffer | None = None,
        links: Sequence[Any] = (),
        save: SaveStage | None = None,
    ):
        self.stage, self.learners, self.source, self.outbox = stage, list(learners), source, outbox
        self.send, self.plan, self.device, self.inbox = send, plan, device, inbox
        self.rank = stage if rank is None else rank
        self.timer = timer or timer_for(device)
        self.trainer = trainer or chain(self.learners)
        self.scored = list(range(len(self.learners)) if scored is None else scored)
        self.links = links  # the Receiver/Sender threads, for their transfer statistics
        self.save = save
        self.saved_step = plan.start_step
        self.clock = StageClock()
        self.tally = self._new_tally(-1)
        self.forwarded: set[int] = set()  # replay: pass each train batch on once, at first use
        # A resumed stage continues inside the epoch of its checkpoint's last step.
        self.last_epoch = max(plan.start_step - 1, 0) // plan.steps_per_epoch
        self.epoch_started = time.perf_counter()
        self.step = plan.start_step
        self.peak_buffer_bytes = 0
        self._next_record = time.perf_counter() + STAGE_RECORD_SECONDS

    def run(self) -> None:
        for batch, waited in self.source:
            self.clock.wait_in += waited
            if batch.kind == Kind.END:
                self._flush_eval()
                self._finish(batch)
                return
            if batch.kind != Kind.EVAL:
                self._flush_eval()
            token = self.timer.start()
            out = self._train(batch) if batch.kind == Kind.TRAIN else self._score(batch)
            self.timer.stop(token)
            if out is not None:
                self._pass_on(out)
            self._maybe_record()
        raise RuntimeError(f"stage {self.stage}: input ended without an END message")

    def _train(self, batch: Batch) -> Batch | None:
        assert batch.x is not None and batch.y is not None
        if batch.epoch != self.last_epoch:
            self._checkpoint()  # the epoch's end, when no test pass marked it
            self._epoch_done()
            self.last_epoch = batch.epoch
        x, y = _on(self.device, batch.x), _on(self.device, batch.y)
        h = self.trainer(x, y)
        for learner in self.learners:
            if learner.meter.steps and learner.steps % self.plan.log_every == 0:
                self._record_train(learner)
        self.clock.samples += len(batch.y)
        self.step = batch.step
        if self.plan.checkpoint_every and batch.step % self.plan.checkpoint_every == 0:
            self._checkpoint()
        if batch.step in self.forwarded:
            return None  # a replayed batch: downstream already has it
        self.forwarded.add(batch.step)
        if len(self.forwarded) > FORWARDED_MEMORY:
            self.forwarded.discard(min(self.forwarded))
        return Batch(Kind.TRAIN, batch.step, batch.epoch, h, batch.y, batch.ids)

    def _score(self, batch: Batch) -> Batch:
        assert batch.x is not None and batch.y is not None
        if self.tally.epoch != batch.epoch:  # the epoch's test pass begins: checkpoint first
            self._checkpoint()
            self.tally = self._new_tally(batch.epoch)
        x, y = _on(self.device, batch.x), _on(self.device, batch.y)
        h = score_batch(self.learners, self.scored, self.tally, x, y)
        return Batch(Kind.EVAL, batch.step, batch.epoch, h, batch.y, batch.ids)

    def _checkpoint(self) -> None:
        """Save the state after this stage's last train step (once per step). Every stage
        saves the same step numbers, so the files form a consistent cut of the pipeline.
        A module whose loss went NaN or inf stops the stage before anything is written."""
        if self.save is None or self.step == self.saved_step:
            return
        self._check_finite()
        self.save(self.step, self.last_epoch)
        self.saved_step = self.step

    def _check_finite(self) -> None:
        for learner in self.learners:
            learner.guard.check(learner.index)

    def _pass_on(self, batch: Batch) -> None:
        if self.outbox is None:
            return
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self._buffered() * batch.nbytes())
        self.clock.wait_out += self.outbox.put(batch)
        self.clock.bytes_sent += batch.nbytes()

    def _buffered(self) -> int:
        return sum(b.depth + 1 for b in (self.inbox, self.outbox) if b is not None)

    def _new_tally(self, epoch: int) -> EvalTally:
        modules = [self.learners[i].index for i in self.scored]
        return EvalTally(modules, epoch)

    def _flush_eval(self) -> None:
        """The test pass of an epoch is complete once anything else arrives."""
        if self.tally.samples == 0:
            return
        steps = [self.learners[i].steps for i in self.scored]
        for rec in self.tally.records(steps, self.stage):
            self.send(rec)
        self.tally = self._new_tally(-1)

    def _epoch_done(self) -> None:
        for learner in self.learners:
            self._record_train(learner)
        self.send(StageRecord(**self.totals()))  # with this epoch's CUDA peak, before reset
        reset_cuda_peak(self.device)
        # Once per schedule: e2e's modules share one optimizer and its schedule.
        schedules = {id(lr.scheduler): lr.scheduler for lr in self.learners}
        with warnings.catch_warnings():
            # A resumed run's first epoch boundary comes before its first optimizer step:
            # torch warns, but the epoch did end and the schedule must move on.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            for schedule in schedules.values():
                schedule.step()
        if self.stage == 0:
            now = time.perf_counter()
            self.send(
                EpochRecord(
                    step=self.step, epoch=self.last_epoch, stage=0, seconds=now - self.epoch_started
                )
            )
            self.epoch_started = now

    def _record_train(self, learner: ModuleLearner) -> None:
        learner.guard.check(learner.index)
        if learner.meter.steps == 0:
            return
        self.send(
            TrainRecord(
                step=learner.steps,
                epoch=self.last_epoch,
                module=learner.index,
                stage=self.stage,
                **learner.log_fields(),
            )
        )

    def _maybe_record(self) -> None:
        if time.perf_counter() >= self._next_record:
            self.send(StageRecord(**self.totals()))
            self._next_record = time.perf_counter() + STAGE_RECORD_SECONDS

    def _finish(self, end: Batch) -> None:
        self._checkpoint()
        self._epoch_done()
        self.timer.settle()
        if self.outbox is not None:
            self.clock.wait_out += self.outbox.put(end)
        self.send(EndRecord(**self.totals()))

    def _shares(self, elapsed: float) -> tuple[float, float, float]:
        """(busy, waiting for input, waiting for output) seconds. On GPU busy is device time
        (CUDA events); the rest of the wall time is waiting, split between input and output
        as the host's blocked time was."""
        busy = self.timer.busy_s()
        c = self.clock
        if not self.timer.device_based:
            return busy, c.wait_in, c.wait_out
        idle = max(elapsed - busy, 0.0)
        blocked = c.wait_in + c.wait_out
        share_in = c.wait_in / blocked if blocked else 1.0
        return busy, idle * share_in, idle * (1.0 - share_in)

    def totals(self) -> dict[str, Any]:
        """Cumulative timing, throughput, transfers and memory of this stage."""
        c = self.clock
        elapsed = time.perf_counter() - c.started
        busy, wait_in, wait_out = self._shares(elapsed)
        staleness = self.inbox.stats().get("mean_staleness") if self.inbox else None
        link_stats = {key: value for link in self.links for key, value in link.stats().items()}
        return {
            "step": self.step,
            "epoch": self.last_epoch,
            "stage": self.stage,
            "rank": self.rank,
            "modules": tuple(learner.index for learner in self.learners),
            "busy_s": busy,
            "wait_in_s": wait_in,
            "wait_out_s": wait_out,
            "samples": c.samples,
            "samples_per_s": c.samples / elapsed if elapsed else 0.0,
            "inbox_depth": self.inbox.depth if self.inbox else 0,
            "bytes_sent": c.bytes_sent,
            "staleness_mean": staleness,
            "peak_rss_mb": peak_rss_mb(),
            "peak_tensor_mb": (state_bytes(self.learners) + self.peak_buffer_bytes) / MIB,
            "cuda_peak_mb": cuda_peak_mb(self.device),
            **link_stats,
        }
