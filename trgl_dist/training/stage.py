"""The stage loop: take a batch, train (or score) this stage's modules on it, pass it on."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from trgl_dist.training.items import Batch, Kind
from trgl_dist.training.learner import ModuleLearner

log = logging.getLogger(__name__)
Send = Callable[[dict[str, Any]], Any]
Save = Callable[[int, int], None]  # (step, epoch): write this stage's checkpoint of that step
STAGE_RECORD_SECONDS = 2.0
FORWARDED_MEMORY = 1024  # far more than any buffer holds, so a replayed step is always known


class Buffer(Protocol):
    """What the stage needs of its inbox and outbox (runtime.buffer.Buffer is one)."""

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


@dataclass
class StageClock:
    """Where a stage's time goes: busy computing, waiting for input, waiting to pass output on."""

    busy: float = 0.0
    wait_in: float = 0.0
    wait_out: float = 0.0
    samples: int = 0
    bytes_sent: int = 0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class EvalTally:
    """Test-set counts of one epoch, per module of the stage."""

    correct: list[torch.Tensor]
    loss: list[torch.Tensor]
    samples: int = 0
    epoch: int = -1


class StageWorker:
    """Runs one stage until the END message; every module keeps its own optimizer.

    ``source`` yields this stage's input batches: the data stream on stage 0, the inbox
    otherwise. ``outbox`` is None on the last stage, whose output is dropped.
    """

    def __init__(
        self,
        stage: int,
        learners: Sequence[ModuleLearner],
        source: Iterator[tuple[Batch, float]],
        outbox: Buffer | None,
        send: Send,
        *,
        log_every: int,
        device: torch.device,
        inbox: Buffer | None = None,
        links: Sequence[Any] = (),
        save: Save | None = None,
        checkpoint_every: int = 0,
        start_step: int = 0,
        steps_per_epoch: int = 1,
    ):
        self.stage, self.learners, self.source, self.outbox = stage, list(learners), source, outbox
        self.send, self.log_every, self.device, self.inbox = send, log_every, device, inbox
        self.links = links  # the Receiver/Sender threads, for their transfer statistics
        self.save, self.checkpoint_every = save, checkpoint_every
        self.saved_step = start_step
        self.clock = StageClock()
        self.tally = self._new_tally(-1)
        self.forwarded: set[int] = set()  # replay: pass each train batch on once, at first use
        # A resumed stage continues inside the epoch of its checkpoint's last step.
        self.last_epoch = max(start_step - 1, 0) // steps_per_epoch
        self.epoch_started = time.perf_counter()
        self.step = start_step
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
            started = time.perf_counter()
            out = self._train(batch) if batch.kind == Kind.TRAIN else self._score(batch)
            self.clock.busy += time.perf_counter() - started
            if out is not None:
                self._pass_on(out)
            self._maybe_record()
        raise RuntimeError(f"stage {self.stage + 1}: input ended without an END message")

    def _train(self, batch: Batch) -> Batch | None:
        assert batch.x is not None and batch.y is not None
        if batch.epoch != self.last_epoch:
            self._epoch_done()
            self.last_epoch = batch.epoch
        h, y = batch.x.to(self.device), batch.y.to(self.device)
        for learner in self.learners:
            h = learner.train_step(h, y)
            if learner.steps % self.log_every == 0:
                self._record_train(learner, batch)
        self.clock.samples += len(y)
        self.step = batch.step
        if self.checkpoint_every and batch.step % self.checkpoint_every == 0:
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
        h, y = batch.x.to(self.device), batch.y.to(self.device)
        for i, learner in enumerate(self.learners):
            h, correct, loss = learner.eval_step(h, y)
            self.tally.correct[i] += correct
            self.tally.loss[i] += loss
        self.tally.samples += len(y)
        return Batch(Kind.EVAL, batch.step, batch.epoch, h, batch.y, batch.ids)

    def _checkpoint(self) -> None:
        """Save the state after this stage's last train step (once per step). Every stage
        saves the same step numbers, so the files form a consistent cut of the pipeline."""
        if self.save is None or self.step == self.saved_step:
            return
        self.save(self.step, self.last_epoch)
        self.saved_step = self.step

    def _pass_on(self, batch: Batch) -> None:
        if self.outbox is None:
            return
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self._buffered() * batch.nbytes())
        self.clock.wait_out += self.outbox.put(batch)
        self.clock.bytes_sent += batch.nbytes()

    def _buffered(self) -> int:
        return sum(b.depth + 1 for b in (self.inbox, self.outbox) if b is not None)

    def _new_tally(self, epoch: int) -> EvalTally:
        zeros = [torch.zeros((), device=self.device) for _ in self.learners]
        return EvalTally(zeros, [z.clone() for z in zeros], 0, epoch)

    def _flush_eval(self) -> None:
        """The test pass of an epoch is complete once anything else arrives."""
        tally = self.tally
        if tally.samples == 0:
            return
        for i, learner in enumerate(self.learners):
            self.send(
                {
                    "kind": "eval",
                    "step": learner.steps,
                    "epoch": tally.epoch,
                    "module": learner.index,
                    "stage": self.stage,
                    "accuracy": tally.correct[i].item() / tally.samples,
                    "loss": tally.loss[i].item() / tally.samples,
                    "samples": tally.samples,
                }
            )
        self.tally = self._new_tally(-1)

    def _epoch_done(self) -> None:
        for learner in self.learners:
            self._record_train(learner, None)
            learner.scheduler.step()
        if self.stage == 0:
            now = time.perf_counter()
            self.send(
                {
                    "kind": "epoch",
                    "step": self.step,
                    "epoch": self.last_epoch,
                    "seconds": now - self.epoch_started,
                }
            )
            self.epoch_started = now

    def _record_train(self, learner: ModuleLearner, batch: Batch | None) -> None:
        if learner.meter.steps == 0:
            return
        epoch = batch.epoch if batch is not None else self.last_epoch
        self.send(
            {
                "kind": "train",
                "step": learner.steps,
                "epoch": epoch,
                "module": learner.index,
                "stage": self.stage,
                **learner.log_fields(),
            }
        )

    def _maybe_record(self) -> None:
        if time.perf_counter() >= self._next_record:
            self.send({"kind": "stage", **self.totals()})
            self._next_record = time.perf_counter() + STAGE_RECORD_SECONDS

    def _finish(self, end: Batch) -> None:
        self._epoch_done()
        if self.outbox is not None:
            self.clock.wait_out += self.outbox.put(end)
        self.send({"kind": "end", **self.totals()})

    def totals(self) -> dict[str, Any]:
        """Cumulative timing, throughput and memory of this stage."""
        c = self.clock
        elapsed = time.perf_counter() - c.started
        staleness = self.inbox.stats().get("mean_staleness") if self.inbox else None
        return {
            "step": self.step,
            "epoch": self.last_epoch,
            "stage": self.stage,
            "modules": [learner.index for learner in self.learners],
            "busy_s": c.busy,
            "wait_in_s": c.wait_in,
            "wait_out_s": c.wait_out,
            "samples": c.samples,
            "samples_per_s": c.samples / elapsed if elapsed else 0.0,
            "inbox_depth": self.inbox.depth if self.inbox else 0,
            "bytes_sent": c.bytes_sent,
            "staleness_mean": staleness,
            **self.memory(),
            **{key: value for link in self.links for key, value in link.stats().items()},
        }

    def memory(self) -> dict[str, float]:
        """Peak memory: the allocator's peak on GPU; on CPU the peak RSS, plus the
        tensor-accounted peak (parameters, gradients, optimizer state, buffered batches)."""
        state = sum(
            t.numel() * t.element_size()
            for learner in self.learners
            for t in _state_tensors(learner)
        )
        out = {
            "peak_rss_mb": peak_rss_mb(),
            "peak_tensor_mb": (state + self.peak_buffer_bytes) / 2**20,
        }
        if self.device.type == "cuda":
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


def _state_tensors(learner: ModuleLearner) -> Iterator[torch.Tensor]:
    for p in learner.module.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
    for state in learner.optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss
    over fork and exec, so a torchrun worker would report at least its launcher's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
