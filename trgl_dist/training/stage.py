"""The stage loop: take a batch, train (or score) this stage's modules on it, pass it on.

The same loop runs a pipeline stage (its input from the inbox, its output to the outbox)
and the one-process lock-step regimes (all modules, the schedule as input, no outbox).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
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
from trgl_dist.metrics.spans import NullRecorder, Recorder
from trgl_dist.training.items import Batch, Kind
from trgl_dist.training.learner import ModuleLearner, Trainer, chain
from trgl_dist.training.memory import (
    MIB,
    cuda_peak_mb,
    peak_rss_mb,
    reset_cuda_peak,
    state_bytes,
    tracked_peak_mb,
)
from trgl_dist.training.stageplan import StageClock, StagePlan
from trgl_dist.training.timing import Timer, timer_for

log = logging.getLogger(__name__)
Send = Callable[[Record], Any]
SaveStage = Callable[[int, int], None]  # (step, epoch): write this stage's checkpoint of that step
STAGE_RECORD_SECONDS = 2.0
#: Training batches a stage computes before its step time is measured (the pipeline fills),
#: and the one of them whose peak memory is measured: tracking every tensor makes that step
#: several times slower, so it is done while the pipeline fills, once the optimizer state
#: exists (after the first step), not in the steady state the step time describes.
WARMUP_BATCHES = 5
PROBE_BATCH = 3
FORWARDED_MEMORY = 1024  # far more than any buffer holds, so a replayed step is always known


class Buffer(Protocol):
    """What the stage needs of its inbox and outbox (runtime.buffer.BatchBuffer is one)."""

    @property
    def depth(self) -> int: ...

    def put(self, batch: Batch) -> float: ...

    def stats(self) -> dict[str, Any]: ...


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
        spans: Recorder | None = None,
    ):
        self.stage, self.learners, self.source, self.outbox = stage, list(learners), source, outbox
        self.send, self.plan, self.device, self.inbox = send, plan, device, inbox
        self.rank = stage if rank is None else rank
        self.timer = timer or timer_for(device)
        self.trainer = trainer or chain(self.learners)
        self.scored = list(range(len(self.learners)) if scored is None else scored)
        self.links = links  # the Receiver/Sender threads, for their transfer statistics
        self.save = save
        self.spans = spans or NullRecorder()
        self.saved_step = plan.start_step
        self.clock = StageClock()
        self.tally = self._new_tally(-1)
        self.forwarded: set[int] = set()  # replay: pass each train batch on once, at first use
        # A resumed stage continues inside the epoch of its checkpoint's last step.
        self.last_epoch = max(plan.start_step - 1, 0) // plan.steps_per_epoch
        self.epoch_started = time.perf_counter()
        self.step = plan.start_step  # the step the modules' state is at
        self.trained = 0  # training batches this stage (replica) trained on
        self.speaks = plan.replica == 0  # replica 0 reports the stage's modules and saves them
        self.peak_buffer_bytes = 0
        self.step_timer = timer_for(device)  # the training steps' compute, after warm-up
        self.timed_steps = 0
        self.step_tensor_mb: float | None = None  # the probed step's own tensors
        self._next_record = time.perf_counter() + STAGE_RECORD_SECONDS

    def run(self) -> None:
        for batch, waited in self.source:
            self.clock.wait_in += waited
            if waited > 0:
                now = time.time_ns()
                self.spans.add("wait for input", "compute", now - int(waited * 1e9), now)
            if batch.kind == Kind.END:
                self._flush_eval()
                self._finish(batch)
                return
            if batch.kind != Kind.EVAL:
                self._flush_eval()
            token = self.timer.start()
            if batch.kind == Kind.TRAIN:
                with self.spans.span(f"train batch {batch.step}", "compute"):
                    out = self._train(batch)
            else:
                with self.spans.span("eval", "compute", step=batch.step):
                    out = self._score(batch)
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
        for learner in self.learners:
            learner.epoch = self.plan.window_epoch(batch.step)
        h = self._timed_step(x, y)
        self.trained += 1
        self.step = self.plan.state_step(batch.step)
        for learner in self.learners:
            learner.steps = batch.step  # the global step (a replica sees one in R)
            if self.trained % self.plan.log_every == 0:
                self._record_train(learner)
        self.clock.samples += len(batch.y)
        if self.plan.checkpoint_every and self.step % self.plan.checkpoint_every == 0:
            self._checkpoint()
        if batch.step in self.forwarded:
            return None  # a replayed batch: downstream already has it
        self.forwarded.add(batch.step)
        if len(self.forwarded) > FORWARDED_MEMORY:
            self.forwarded.discard(min(self.forwarded))
        return Batch(Kind.TRAIN, batch.step, batch.epoch, h, batch.y, batch.ids)

    def _timed_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The trainer on one batch; its compute timed once the pipeline has filled, and at
        PROBE_BATCH the peak of the step's own tensors measured."""
        if self.trained + 1 == PROBE_BATCH and self.plan.probe_memory:
            tracked: list[torch.nn.Module | torch.optim.Optimizer | torch.Tensor] = [x, y]
            for learner in self.learners:
                tracked += [learner.module, learner.optimizer]
            h, self.step_tensor_mb = tracked_peak_mb(lambda: self.trainer(x, y), tracked,
                                                     self.device)
            return h
        if self.trained < WARMUP_BATCHES:
            return self.trainer(x, y)
        token = self.step_timer.start()
        h = self.trainer(x, y)
        self.step_timer.stop(token)
        self.timed_steps += 1
        return h

    def _step_peak_mb(self) -> float | None:
        """The measured step's tensors plus the most bytes this stage's buffers have held
        (the batches queued around a step, at most capacity each side)."""
        if self.step_tensor_mb is None:
            return None
        queued = sum(
            box.stats().get("max_bytes_held", 0)
            for box in (self.inbox, self.outbox)
            if box is not None
        )
        return self.step_tensor_mb + queued / MIB

    def _score(self, batch: Batch) -> Batch:
        assert batch.x is not None and batch.y is not None
        if self.tally.epoch != batch.epoch:  # the epoch's test pass begins: checkpoint first
            self._checkpoint()
            self.tally = self._new_tally(batch.epoch)
        x, y = _on(self.device, batch.x), _on(self.device, batch.y)
        h = score_batch(self.learners, self.scored, self.tally, x, y)
        return Batch(Kind.EVAL, batch.step, batch.epoch, h, batch.y, batch.ids)

    def _checkpoint(self, final: bool = False) -> None:
        """Save the state after this stage's last train step (once per step). Every stage
        saves the same step numbers, so the files form a consistent cut of the pipeline:
        steps where every stage's replicas have stepped together and no accumulation window
        is open (and the run's end). A module whose loss went NaN or inf stops the stage
        before anything is written."""
        if self.save is None or self.step == self.saved_step or not self.speaks:
            return
        if any(learner.in_window for learner in self.learners):
            return
        if not final and self.step % self.plan.period:
            return
        self._check_finite()
        with self.spans.span("checkpoint", "compute", step=self.step):
            self.save(self.step, self.last_epoch)
        self.saved_step = self.step

    def _check_finite(self) -> None:
        for learner in self.learners:
            learner.guard.check(learner.index)

    def _pass_on(self, batch: Batch) -> None:
        if self.outbox is None:
            return
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self._buffered() * batch.nbytes())
        blocked = self.outbox.put(batch)
        self.clock.wait_out += blocked
        if blocked > 0:
            now = time.time_ns()
            self.spans.add("blocked on outbox", "compute", now - int(blocked * 1e9), now)
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
        steps = [self.step for _ in self.scored]
        for rec in self.tally.records(steps, self.stage):
            self.send(rec)
        self.tally = self._new_tally(-1)

    def _epoch_done(self) -> None:
        for learner in self.learners:
            self._record_train(learner)
        self.send(StageRecord(**self.totals()))  # with this epoch's CUDA peak, before reset
        reset_cuda_peak(self.device)
        if self.stage == 0 and self.speaks:
            now = time.perf_counter()
            self.send(
                EpochRecord(
                    step=self.step, epoch=self.last_epoch, stage=0, seconds=now - self.epoch_started
                )
            )
            self.epoch_started = now

    def _record_train(self, learner: ModuleLearner) -> None:
        learner.guard.check(learner.index)
        if learner.meter.steps == 0 or not self.speaks:
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
        self._close_windows(end.step)
        self._checkpoint(final=True)
        self._epoch_done()
        self.timer.settle()
        self.step_timer.settle()
        if self.outbox is not None:
            self.clock.wait_out += self.outbox.put(end)
        self.spans.flush()  # on disk before the end record: the coordinator then merges
        self.send(EndRecord(**self.totals()))

    def _close_windows(self, last_step: int) -> None:
        """At the end of the run: an accumulation window still open is stepped with what it
        has; a replica without a batch in the last, partial window joins its replicas' last
        gradient sum with zeros. Every replica then holds the same modules, at the last step."""
        for learner in self.learners:
            learner.epoch = self.plan.epoch_of(last_step)
        r = self.plan.replicas
        if r > 1 and last_step > self.plan.start_step and last_step % r:
            if self.plan.replica >= last_step % r:
                for learner in self.learners:
                    learner.sit_out_window()
            self.step = last_step
        for learner in self.learners:
            if learner.in_window:
                learner.update()

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
            "replica": self.plan.replica,
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
            "step_ms": 1000 * self.step_timer.busy_s() / self.timed_steps
            if self.timed_steps
            else None,
            "step_peak_mb": self._step_peak_mb(),
            **link_stats,
        }
