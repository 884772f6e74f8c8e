"""The single-process regimes against hand-written reference loops."""

import math

import torch

from tests.helpers import make_context, parameters, small_config, snapshot
from trgl_dist.regimes import RUNNERS
from trgl_dist.regimes.sequential import lap_epochs


def _run(config):
    records: list = []
    ctx = make_context(config, records)
    RUNNERS[config.train.regime](ctx)
    return ctx, records


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
    from trgl_dist.regimes.common import batches

    for x, y in list(batches(manual, 0, ""))[:2]:
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
    seq_epochs = sum(1 for r in seq_records if r["kind"] == "epoch")
    lap_epochs_run = sum(1 for r in lap_records if r["kind"] == "epoch")
    assert seq_epochs == lap_epochs_run == 2 + 3 + 4
    assert lap_epochs(5, 2) == [3, 2] and lap_epochs(1, 3) == [1, 0, 0]


def test_multilap_carries_optimizer_state_across_laps():
    ctx, _ = _run(small_config(train={"regime": "multilap", "laps": 2, "epochs": 2}))
    state = ctx.learners[0].optimizer.state
    assert state and all("momentum_buffer" in s for s in state.values())
    assert ctx.learners[0].steps == 2 * 4


def test_cached_sequential_trains_on_frozen_outputs():
    ctx, records = _run(small_config(train={"regime": "sequential", "cache_frozen": True}))
    assert [lr.steps for lr in ctx.learners] == [4, 4, 4]
    assert {r["module"] for r in records if r["kind"] == "eval"} == {0, 1, 2}


def test_every_regime_scores_modules_each_epoch():
    _, records = _run(small_config(train={"epochs": 2}))
    evals = [r for r in records if r["kind"] == "eval"]
    assert sorted((r["epoch"], r["module"]) for r in evals) == [
        (e, k) for e in (0, 1) for k in range(3)
    ]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in evals)
    trains = [r for r in records if r["kind"] == "train"]
    assert {r["module"] for r in trains} == {0, 1, 2}
    assert all(r["tau"] in (0.5, 1.0) for r in trains)
