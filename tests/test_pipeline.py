"""The pipeline on real Gloo processes: equivalence with `parallel`, buffers, eval, end of run."""

import math
import os
import threading
import time

import pytest
import torch

from tests.distributed import run_workers
from tests.helpers import make_context, small_config
from trgl_dist.metrics.records import EndRecord, EpochRecord, EvalRecord, TrainRecord
from trgl_dist.regimes import RUNNERS
from trgl_dist.runtime.link import PeerFailure
from trgl_dist.runtime.wiring import build_stage, run_stage
from trgl_dist.training.stageplan import stage_modules


def _stage_worker(topology, config, slow_first_stage_s=0.0):
    """One rank: build, run, return this stage's parameters, the records it sent and its
    inbox statistics. ``slow_first_stage_s`` makes stage 0 sleep before every step."""
    records: list = []
    stage = build_stage(config, topology)
    if topology.is_first and slow_first_stage_s:
        step = stage.learners[0].train_step

        def slow(x, y):
            time.sleep(slow_first_stage_s)
            return step(x, y)

        stage.learners[0].train_step = slow
    worker = run_stage(config, topology, stage, records.append)
    params = {
        learner.index: [p.detach().clone() for p in learner.module.parameters()]
        for learner in stage.learners
    }
    inbox = worker.inbox.stats() if worker.inbox is not None else None
    return params, records, inbox


def _thread_policies_while_training(topology, config):
    """One rank: the scheduling policy of each of its threads, seen from its compute thread
    during its first training step (every link, Gloo, watchdog thread exists by then)."""
    stage = build_stage(config, topology)
    seen: dict[int, int] = {}
    step = stage.learners[0].train_step

    def looking(x, y):
        if not seen:
            for name in os.listdir("/proc/self/task"):
                seen[int(name)] = os.sched_getscheduler(int(name))
        return step(x, y)

    stage.learners[0].train_step = looking
    run_stage(config, topology, stage, lambda record: None)
    return threading.get_native_id(), seen


def test_a_ranks_helper_threads_never_preempt_its_compute_thread():
    config = small_config(model={"modules": 2})
    results = run_workers(_thread_policies_while_training, 2, config, deadline_s=120)
    for r in results:
        assert r.exitcode == 0, r.error
        compute, policies = r.value
        assert policies.pop(compute) == os.SCHED_OTHER
        assert len(policies) >= 3  # a link thread and Gloo's threads at least
        assert set(policies.values()) == {os.SCHED_BATCH}, policies


def _parallel_reference(config):
    # One thread, as in the workers: the same reduction order makes the runs bit-comparable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = make_context(config)
        RUNNERS["parallel"](ctx)
    finally:
        torch.set_num_threads(threads)
    return {lr.index: [p.detach() for p in lr.module.parameters()] for lr in ctx.learners}


@pytest.mark.parametrize("world_size, modules", [(2, 3), (3, 3), (3, 5)])
def test_fifo_pipeline_equals_lock_step_parallel(world_size, modules):
    # 64 samples / batch 12 -> 5 full batches and a short last one (variable last batch),
    # two epochs so the epoch boundary and the test pass sit between training batches.
    config = small_config(
        model={"modules": modules},
        data={"batch_size": 12},
        train={"epochs": 2},
        pipeline={"buffer_size": 2},
    )
    results = run_workers(_stage_worker, world_size, config, deadline_s=120)
    for r in results:
        assert r.exitcode == 0, r.error
    reference = _parallel_reference(config.replace("train", regime="parallel"))
    got = {k: v for r in results for k, v in r.value[0].items()}
    assert sorted(got) == list(range(modules))
    for k in range(modules):
        for a, b in zip(got[k], reference[k], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    steps = math.ceil(64 / 12) * 2
    trains = [rec for r in results for rec in r.value[1] if isinstance(rec, TrainRecord)]
    assert max(rec.step for rec in trains if rec.module == modules - 1) == steps


def test_eval_results_and_end_records_reach_the_sink():
    config = small_config(model={"modules": 2}, train={"epochs": 2})
    results = run_workers(_stage_worker, 2, config, deadline_s=120)
    assert [r.exitcode for r in results] == [0, 0], [r.error for r in results]
    records = [rec for r in results for rec in r.value[1]]
    evals = sorted((rec.epoch, rec.module, rec.samples) for rec in records
                   if isinstance(rec, EvalRecord))
    assert evals == [(e, k, 32) for e in (0, 1) for k in (0, 1)]
    ends = [rec for rec in records if isinstance(rec, EndRecord)]
    assert sorted(rec.stage for rec in ends) == [0, 1]
    assert all(rec.samples == 2 * 64 for rec in ends)
    assert [rec.epoch for rec in records if isinstance(rec, EpochRecord)] == [0, 1]


def test_replay_retrains_while_upstream_is_slow_but_never_past_max_reuse():
    # Stage 0 sleeps 0.3 s a step, so stage 1 has time to spare: replay must fill it with
    # batches it already holds, each used at most max_reuse times.
    config = small_config(
        model={"modules": 2},
        train={"epochs": 1},
        pipeline={"buffer_policy": "replay", "max_reuse": 3, "buffer_size": 4},
    )
    results = run_workers(_stage_worker, 2, config, 0.3, deadline_s=120)
    assert [r.exitcode for r in results] == [0, 0], [r.error for r in results]
    (end,) = [rec for rec in results[1].value[1] if isinstance(rec, EndRecord)]
    histogram = results[1].value[2]["reuse_histogram"]
    uses = sum(count * times for times, count in histogram.items())
    assert sum(histogram.values()) == 4  # every one of the 4 batches, retired once
    assert max(histogram) <= 3 and uses > 4  # replayed, never past max_reuse
    assert end.samples == 16 * uses


def test_stage_modules_split_and_too_many_ranks():
    assert [list(stage_modules(8, 3, s)) for s in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert list(stage_modules(16, 4, 3)) == [12, 13, 14, 15]
    with pytest.raises(ValueError, match="more ranks"):
        stage_modules(2, 4, 0)


def test_eval_every_zero_scores_only_after_the_last_epoch_and_stays_exact():
    config = small_config(
        model={"modules": 3}, data={"batch_size": 12}, train={"epochs": 3, "eval_every": 0}
    )
    results = run_workers(_stage_worker, 2, config, deadline_s=120)
    assert [r.exitcode for r in results] == [0, 0], [r.error for r in results]
    evals = {(rec.epoch, rec.module) for r in results for rec in r.value[1]
             if isinstance(rec, EvalRecord)}
    assert evals == {(2, k) for k in range(3)}
    reference = _parallel_reference(config.replace("train", regime="parallel"))
    got = {k: v for r in results for k, v in r.value[0].items()}
    for k in range(3):
        for a, b in zip(got[k], reference[k], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _failing_middle_worker(topology, config):
    """Stage 1 raises in its third training step; every rank says how it ended."""
    stage = build_stage(config, topology)
    if topology.stage == 1:
        step, calls = stage.learners[0].train_step, []

        def fail_at_third(x, y):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("boom in the middle stage")
            return step(x, y)

        stage.learners[0].train_step = fail_at_third
    try:
        run_stage(config, topology, stage, lambda record: None)
    except PeerFailure as err:
        return {"peer": err.peer, "message": str(err)}
    except RuntimeError as err:
        return {"raised": str(err)}
    return {}


def test_a_failing_stage_sends_its_error_downstream():
    # Without the ERROR batch the last stage would only see the connection close, and
    # could not say why; here no coordinator is running to tell it either.
    config = small_config(model={"modules": 3}, data={"synthetic_train": 640})
    results = run_workers(_failing_middle_worker, 3, config, deadline_s=120)
    assert not any(r.timed_out for r in results), [r.error for r in results]
    upstream, middle, downstream = (r.value for r in results)
    assert middle == {"raised": "boom in the middle stage"}
    assert downstream["peer"] == 1
    assert "RuntimeError: boom in the middle stage" in downstream["message"]
    assert upstream["peer"] == 1  # its next send found stage 1 gone
