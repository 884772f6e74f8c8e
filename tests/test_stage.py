"""The stage loop and the schedule in one process: stages in threads, joined by a buffer."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from tests.helpers import make_context, parameters, small_config
from trgl_dist.metrics.records import (
    CheckpointRecord,
    EndRecord,
    EpochRecord,
    EvalRecord,
    TrainRecord,
)
from trgl_dist.regimes import RUNNERS
from trgl_dist.runtime.buffer import BatchBuffer
from trgl_dist.training import stage as stage_module
from trgl_dist.training.items import Kind
from trgl_dist.training.memory import MIB
from trgl_dist.training.schedule import batch_stream, inbox_stream, stage_plan
from trgl_dist.training.stage import PROBE_BATCH, WARMUP_BATCHES, StageWorker


def two_stages_in_threads(config, split: int):
    """Modules [0, split) in stage 0 (fed by the schedule), the rest in stage 1 (fed by a
    buffer that is stage 0's outbox), each stage in its own thread. Returns the context
    (its learners trained) and every record with the saves each stage made."""
    ctx = make_context(config)
    between = BatchBuffer(config.pipeline.buffer_size)
    records: list = []
    saves: list = []
    plan = stage_plan(config, ctx.feed)
    first = StageWorker(
        0, ctx.learners[:split], batch_stream(config, ctx.feed), between,
        records.append, plan, device=torch.device("cpu"),
        save=lambda step, epoch: saves.append((0, step, epoch)),
    )
    second = StageWorker(
        1, ctx.learners[split:], inbox_stream(between), None, records.append, plan,
        device=torch.device("cpu"), inbox=between,
        save=lambda step, epoch: saves.append((1, step, epoch)),
    )
    errors: list[BaseException] = []

    def run(worker: StageWorker) -> None:
        try:
            worker.run()
        except BaseException as err:  # noqa: BLE001 - the test reports it
            errors.append(err)
            between.fail(err)

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    return ctx, records, saves


def test_two_stages_in_threads_equal_the_lock_step_run():
    config = small_config(data={"batch_size": 12}, train={"epochs": 2, "checkpoint_every": 4})
    ctx, records, saves = two_stages_in_threads(config, split=1)
    reference = make_context(config)
    RUNNERS["parallel"](reference)
    for a, b in zip(parameters(ctx), parameters(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Both stages saved the same steps: every 4 steps and each epoch's end (6 steps an epoch).
    for stage in (0, 1):
        assert [s[1] for s in saves if s[0] == stage] == [4, 6, 8, 12]
    assert sorted((r.epoch, r.module) for r in records if isinstance(r, EvalRecord)) == [
        (e, k) for e in (0, 1) for k in range(3)
    ]
    assert [r.epoch for r in records if isinstance(r, EpochRecord)] == [0, 1]
    assert sorted(r.stage for r in records if isinstance(r, EndRecord)) == [0, 1]
    trained = {(r.module, r.stage) for r in records if isinstance(r, TrainRecord)}
    assert trained == {(0, 0), (1, 1), (2, 1)}
    assert not any(isinstance(r, CheckpointRecord) for r in records)  # save() owns those


def test_the_schedule_yields_train_then_eval_per_epoch_then_end():
    config = small_config(train={"epochs": 2})
    ctx = make_context(config)
    kinds = [(b.kind, b.epoch, b.step) for b, _ in batch_stream(config, ctx.feed)]
    per_epoch = [(Kind.TRAIN, e, s) for e in (0, 1) for s in range(4 * e + 1, 4 * e + 5)]
    evals = {e: [(Kind.EVAL, e, 4 * e + 4)] for e in (0, 1)}  # 32 test samples, batch 32
    assert kinds == [*per_epoch[:4], *evals[0], *per_epoch[4:], *evals[1], (Kind.END, 1, 8)]
    resumed = [(b.kind, b.step) for b, _ in batch_stream(config, ctx.feed, 6)]
    assert resumed == [(Kind.TRAIN, 7), (Kind.TRAIN, 8), (Kind.EVAL, 8), (Kind.END, 8)]


def test_a_nan_loss_stops_the_stage_before_the_next_checkpoint():
    config = small_config(optim={"lr": 1e12}, train={"epochs": 5, "checkpoint_every": 1})
    ctx = make_context(config)
    saved: list[int] = []
    worker = StageWorker(
        0, ctx.learners, batch_stream(config, ctx.feed), None,
        lambda rec: None, stage_plan(config, ctx.feed), device=torch.device("cpu"),
        save=lambda step, epoch: saved.append(step),
    )
    with pytest.raises(FloatingPointError, match=r"module \d: loss is (nan|inf|-inf) at step"):
        worker.run()
    bad = min(int(lr.guard.step) for lr in ctx.learners if int(lr.guard.step))
    assert saved and max(saved) < bad  # no checkpoint at or after the first bad step


def test_the_memory_probe_runs_while_the_pipeline_fills_and_adds_what_the_buffers_held(
    monkeypatch,
):
    # Tracking every tensor makes the probed step several times slower: it must fall among
    # the warm-up batches (whose compute is not timed), not in the steady state.
    probed_after: list[int] = []
    real = stage_module.tracked_peak_mb
    config = small_config(data={"batch_size": 8}, train={"epochs": 2},
                          pipeline={"buffer_size": 2})  # fmt: skip
    ctx = make_context(config)
    records: list = []
    outbox = BatchBuffer(2)
    plan = dataclasses.replace(stage_plan(config, ctx.feed), probe_memory=True)
    worker = StageWorker(0, ctx.learners[:1], batch_stream(config, ctx.feed), outbox,
                         records.append, plan, device=torch.device("cpu"))  # fmt: skip

    def spy(run, tracked, device):
        probed_after.append(worker.trained)
        return real(run, tracked, device)

    monkeypatch.setattr(stage_module, "tracked_peak_mb", spy)

    def drain() -> None:  # the next stage, computing nothing (MemTracker: one thread at a time)
        while outbox.get()[0].kind != Kind.END:
            pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    worker.run()
    reader.join(60)
    assert probed_after == [PROBE_BATCH - 1]
    assert 1 < PROBE_BATCH <= WARMUP_BATCHES  # once the optimizer state exists; untimed
    assert worker.timed_steps == 2 * 64 // 8 - WARMUP_BATCHES
    held = outbox.stats()["max_bytes_held"]
    assert held > 0 and worker.step_tensor_mb is not None and worker.step_tensor_mb > 0
    (end,) = [r for r in records if isinstance(r, EndRecord)]
    assert end.step_peak_mb == pytest.approx(worker.step_tensor_mb + held / MIB)
