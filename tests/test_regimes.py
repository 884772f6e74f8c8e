"""The single-process regimes against hand-written reference loops."""

import math

import pytest
import torch

from tests.helpers import make_context, parameters, small_config, snapshot
from trgl_dist.metrics.records import EndRecord, EpochRecord, EvalRecord, TrainRecord
from trgl_dist.regimes import RUNNERS, sequential
from trgl_dist.regimes.sequential import lap_epochs


def _run(config):
    records: list = []
    ctx = make_context(config, records)
    RUNNERS[config.train.regime](ctx)
    return ctx, records


def _of(records, kind):
    return [r for r in records if type(r) is kind]


def test_one_module_parallel_equals_e2e():
    common = {"model": {"modules": 1}, "method": {"name": "vanilla"}, "train": {"max_steps": 3}}
    par, _ = _run(small_config(**common, optim={"lr": 0.05}))
    e2e, _ = _run(
        small_config(
            model={"modules": 1},
            method={"name": "vanilla"},
            train={"max_steps": 3, "regime": "e2e"},
            optim={"lr": 0.05, "schedule": "constant"},
        )
    )
    assert par.learners[0].steps == e2e.learners[0].steps == 3
    for a, b in zip(parameters(par), parameters(e2e), strict=True):
        torch.testing.assert_close(a, b)


def test_trgl_with_infinite_tau_equals_vanilla():
    trgl, _ = _run(small_config(method={"name": "trgl", "tau": math.inf}, train={"max_steps": 3}))
    van, _ = _run(small_config(method={"name": "vanilla"}, train={"max_steps": 3}))
    for a, b in zip(parameters(trgl), parameters(van), strict=True):
        torch.testing.assert_close(a, b)
    finite, _ = _run(small_config(method={"name": "trgl", "tau": 0.01}, train={"max_steps": 3}))
    assert any(
        not torch.equal(a, b) for a, b in zip(parameters(finite), parameters(van), strict=True)
    )


def test_parallel_feeds_each_module_the_output_computed_before_the_update():
    config = small_config(train={"max_steps": 2})
    ctx = make_context(config)
    manual = make_context(config)
    # Reference: run the same two batches by hand, computing module k's output with the
    # weights it had *before* its step on that batch.
    for x, y, _ids in list(manual.feed.train_batches(0))[:2]:
        h = x
        for learner in manual.learners:
            with torch.no_grad():
                learner.module.train()
                before = learner.module(h).h.detach()
            out = learner.train_step(h, y)
            # The BN running stats moved twice in the reference forward; outputs in train
            # mode do not depend on running stats, so the values must agree exactly.
            torch.testing.assert_close(out, before)
            h = before
    RUNNERS["parallel"](ctx)
    for a, b in zip(parameters(ctx), parameters(manual), strict=True):
        torch.testing.assert_close(a, b)


def test_sequential_leaves_frozen_modules_unchanged_bn_statistics_included():
    config = small_config(train={"regime": "sequential", "epochs": 1})
    ctx = make_context(config)
    seen = {}
    original = ctx.learners[1].train_step

    def spy(x, y):  # while module 2 trains, module 1 must be frozen
        seen.setdefault("first", snapshot(ctx.learners[0].module))
        return original(x, y)

    ctx.learners[1].train_step = spy
    RUNNERS["sequential"](ctx)
    after = ctx.learners[0].module.state_dict()
    assert any("running_mean" in key for key in after)
    for key, value in seen["first"].items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


def test_sequential_trains_each_module_for_its_budget_and_multilap_matches_total():
    seq, seq_records = _run(
        small_config(
            train={"regime": "sequential", "module_epochs_base": 1, "module_epochs_slope": 1}
        )
    )
    lap, lap_records = _run(
        small_config(
            train={
                "regime": "multilap",
                "laps": 2,
                "module_epochs_base": 1,
                "module_epochs_slope": 1,
            }
        )
    )
    per_epoch = math.ceil(64 / 16)
    assert [lr.steps for lr in seq.learners] == [2 * per_epoch, 3 * per_epoch, 4 * per_epoch]
    assert [lr.steps for lr in lap.learners] == [lr.steps for lr in seq.learners]
    assert len(_of(seq_records, EpochRecord)) == len(_of(lap_records, EpochRecord)) == 2 + 3 + 4
    assert lap_epochs(5, 2) == [3, 2] and lap_epochs(1, 3) == [1, 0, 0]


@pytest.mark.slow
def test_multilap_carries_optimizer_state_across_laps():
    # Module 1 is first: nothing before it changes between laps, so two laps of one epoch
    # with the optimizer (momentum) carried over are exactly two consecutive epochs. A
    # fresh optimizer in lap 2 would restart the momentum and end elsewhere.
    lap, _ = _run(small_config(train={"regime": "multilap", "laps": 2, "epochs": 2}))
    seq, _ = _run(small_config(train={"regime": "sequential", "epochs": 2}))
    assert lap.learners[0].steps == seq.learners[0].steps == 2 * 4
    for a, b in zip(
        lap.learners[0].module.parameters(), seq.learners[0].module.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cached_sequential_runs_the_frozen_modules_once_per_module(monkeypatch):
    calls = {"cached": 0, "recomputed": 0}
    original = sequential.frozen_forward

    def counting(key):
        def forward(frozen, x):
            if frozen:
                calls[key] += 1
            return original(frozen, x)

        return forward

    for key, cache in (("cached", True), ("recomputed", False)):
        monkeypatch.setattr(sequential, "frozen_forward", counting(key))
        ctx, records = _run(
            small_config(train={"regime": "sequential", "epochs": 2, "cache_frozen": cache})
        )
        assert [lr.steps for lr in ctx.learners] == [8, 8, 8]
    # 4 batches an epoch; modules 2 and 3 have frozen predecessors.
    assert calls == {"cached": 2 * 4, "recomputed": 2 * 2 * 4}


@pytest.mark.parametrize("regime", ["parallel", "e2e", "sequential", "multilap"])
def test_every_regime_scores_its_trained_modules_each_epoch(regime):
    _, records = _run(small_config(train={"epochs": 2, "regime": regime, "laps": 2}))
    evals = _of(records, EvalRecord)
    assert all(0.0 <= r.accuracy <= 1.0 and r.samples == 32 for r in evals)
    scored = sorted((r.epoch, r.module) for r in evals)
    if regime == "parallel":
        assert scored == [(e, k) for e in (0, 1) for k in range(3)]
    elif regime == "e2e":
        assert scored == [(0, 2), (1, 2)]  # only the last head is trained
    else:  # one module at a time, its own epochs
        assert scored == sorted((e, k) for e in (0, 1) for k in range(3))
    trains = _of(records, TrainRecord)
    trained = {0, 1, 2} if regime != "e2e" else {2}
    assert {r.module for r in trains} == trained
    if regime != "e2e":
        assert all(r.tau in (0.5, 1.0) for r in trains)
    ends = _of(records, EndRecord)
    assert len(ends) == (1 if regime in ("parallel", "e2e") else 0)


@pytest.mark.parametrize("regime", ["parallel", "e2e"])
def test_the_learning_rate_schedule_moves_once_per_epoch(regime):
    # The schedule moves on at the first optimizer step of each new epoch: after three
    # epochs it has moved twice, and the last epoch's steps took its third value.
    config = small_config(train={"epochs": 3, "regime": regime}, optim={"schedule": "cosine"})
    ctx, _ = _run(config)
    assert {lr.scheduler.last_epoch for lr in ctx.learners} == {2}
    third = 0.05 * (1 + math.cos(math.pi * 2 / 3)) / 2
    for learner in ctx.learners:
        assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(third, rel=1e-6)


@pytest.mark.parametrize("regime", ["parallel", "e2e", "sequential", "multilap"])
@pytest.mark.parametrize(("every", "scored_epochs"), [(2, [1, 2]), (0, [2])])
def test_eval_every_scores_those_epochs_and_always_the_last(regime, every, scored_epochs):
    config = small_config(train={"epochs": 3, "regime": regime, "laps": 2, "eval_every": every})
    _, records = _run(config)
    epochs = sorted({r.epoch for r in _of(records, EvalRecord)})
    assert epochs == scored_epochs


def test_eval_size_scores_a_fixed_balanced_subset_and_every_epoch_still_checkpoints(tmp_path):
    from trgl_dist.checkpoints.manifest import complete_steps
    from trgl_dist.train import main

    args = ["--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-test", "40",
            "--model", "resnet-small", "--width", "8", "--batch-size", "16", "--modules", "2",
            "--epochs", "3", "--eval-every", "0", "--eval-size", "20", "--keep-checkpoints", "0"]
    assert main([*args, "--out", str(tmp_path / "r")]) == 0
    assert complete_steps(tmp_path / "r") == [4, 8, 12]  # each epoch's end, scored or not
    from trgl_dist.metrics.records import read_records

    evals = _of(read_records(tmp_path / "r" / "metrics.jsonl"), EvalRecord)
    assert [(r.epoch, r.samples) for r in evals] == [(2, 20), (2, 20)]
