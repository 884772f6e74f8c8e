"""Stage replicas: the layout, exactness against one process accumulating gradients, a
killed replica named, and checkpoints resumed under another layout of ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_workers
from tests.helpers import small_config
from tests.launcher import rank_process, torchrun
from tests.test_checkpoint import _assert_same, _params
from tests.test_pipeline import _parallel_reference, _stage_worker
from trgl_dist.checkpoints import manifest
from trgl_dist.layout import Layout, LayoutError
from trgl_dist.metrics.records import EndRecord, TrainRecord, read_records


def test_layout_places_ranks_stage_by_stage_and_links_the_replicas_that_share_batches():
    layout = Layout.for_world(5, (2, 3))
    assert [layout.place(r) for r in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert layout.period == 6
    # gcd(2, 3) = 1: every replica of stage 0 meets every replica of stage 1
    assert layout.links() == [(0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]
    even = Layout.for_world(6, (2, 4))
    # gcd 2: replica i sends only to the replicas j with j = i mod 2
    assert even.links() == [(0, 2), (0, 4), (1, 3), (1, 5)]
    assert [even.replica_for(1, step) for step in range(1, 6)] == [0, 1, 2, 3, 0]
    for step in range(1, 50):  # the pair that handles a batch is always linked
        i, j = even.replica_for(0, step), even.replica_for(1, step)
        assert (even.rank_of(0, i), even.rank_of(1, j)) in even.links()
    assert Layout.for_world(4, (2,)).replicas == (2, 2)
    assert Layout.for_world(3).replicas == (1, 1, 1)
    assert layout.describe(1) == "stage 0 replica 1 (rank 1)"
    assert Layout.for_world(3).describe(1) == "stage 1 (rank 1)"
    with pytest.raises(LayoutError, match="needs 3 ranks, the launcher started 4"):
        Layout.for_world(4, (2, 1))
    with pytest.raises(LayoutError, match="not a multiple of 2"):
        Layout.for_world(3, (2,))


def _replica_worker(topology, config):
    params, records, _ = _stage_worker(topology, config)
    return topology.stage, topology.replica, params, records


# 70 samples / batch 10 = 7 steps an epoch: the windows of two batches straddle each epoch's
# end, where the cosine schedule moves the learning rate. 3 epochs = 21 steps: the run ends
# in a partial window, which one replica sits out.
@pytest.mark.parametrize("replicas, accumulate", [((2, 2), (2, 2, 2, 2)), ((2, 1), (2, 2, 1, 1))])
def test_replicated_fifo_pipeline_equals_one_process_accumulating_gradients(
    replicas, accumulate
):
    config = small_config(
        model={"modules": 4},
        data={"batch_size": 10, "synthetic_train": 70},
        optim={"schedule": "cosine"},
        train={"epochs": 3},
    )
    results = run_workers(
        _replica_worker, sum(replicas), config, deadline_s=180, replicas=replicas
    )
    assert all(r.exitcode == 0 for r in results), [r.error for r in results]
    reference = _parallel_reference(
        config.replace("train", regime="parallel", accumulate=accumulate)
    )
    by_place = {(r.value[0], r.value[1]): r.value[2] for r in results}
    assert sorted(by_place) == [(s, i) for s, n in enumerate(replicas) for i in range(n)]
    for (stage, _replica), params in by_place.items():
        assert sorted(params) == [2 * stage, 2 * stage + 1]
        for k, tensors in params.items():
            for a, b in zip(tensors, reference[k], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the replicas of a stage hold identical parameters, bit for bit
    for k, tensors in by_place[(0, 1)].items():
        for a, b in zip(tensors, by_place[(0, 0)][k], strict=True):
            assert torch.equal(a, b)
    records = {(r.value[0], r.value[1]): r.value[3] for r in results}
    for place, recs in records.items():
        trains = [rec for rec in recs if isinstance(rec, TrainRecord)]
        assert bool(trains) == (place[1] == 0)  # replica 0 speaks for the stage's modules
        (end,) = [rec for rec in recs if isinstance(rec, EndRecord)]
        assert (end.stage, end.replica) == place
    samples = sum(rec.samples for recs in records.values() for rec in recs
                  if isinstance(rec, EndRecord) and rec.stage == 0)
    assert samples == 3 * 70  # the replicas shared every training batch, once each


SMALL = ["--dataset", "synthetic", "--model", "resnet-small", "--width", "8", "--batch-size",
         "16", "--modules", "4", "--log-every", "2"]


@pytest.mark.slow
def test_a_killed_replica_stops_every_process_and_is_named_by_stage_and_replica(tmp_path):
    out = tmp_path / "run"
    killed: list[float] = []

    def kill_replica_1_of_stage_0(launcher, elapsed):
        path = out / "metrics.jsonl"
        if not path.exists() or not any(
            isinstance(r, TrainRecord) and r.stage == 1 for r in read_records(path)
        ):
            return False
        victim = rank_process(launcher, 1)
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        killed.append(elapsed)
        return True

    args = [*SMALL, "--stage-replicas", "2,1", "--epochs", "50", "--synthetic-train", "2048",
            "--link-timeout", "8", "--out", str(out)]
    launch = torchrun(3, args, during=kill_replica_1_of_stage_0)
    assert killed, launch.output
    assert launch.code != 0
    assert "trgl_dist: training failed: stage 0 replica 1 (rank 1) died" in launch.output, (
        launch.output
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failure"]["rank"] == 1 and summary["failure"]["cause"] == "died"
    assert launch.survivors() == []


RESUMABLE = [*SMALL, "--synthetic-train", "256", "--checkpoint-every", "4",
             "--keep-checkpoints", "0"]


@pytest.mark.slow
def test_a_checkpoint_of_four_stages_resumes_on_two_exactly_as_an_uninterrupted_run(tmp_path):
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    assert torchrun(2, [*RESUMABLE, "--max-steps", "16", "--out", str(straight)]).code == 0
    first = torchrun(4, [*RESUMABLE, "--max-steps", "8", "--out", str(moved)])
    assert first.code == 0, first.output
    resumed = torchrun(2, ["--resume", str(moved), "--max-steps", "16"])
    assert resumed.code == 0, resumed.output
    assert manifest.latest(moved)[0] == 16
    _assert_same(_params(straight, 16), _params(moved, 16))


def _one_thread(*args: str) -> None:
    """The one-process reference with one thread, like each torchrun rank: the same
    reduction order makes the runs bit-comparable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "trgl_dist.train", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _trained_state(run_dir, step):
    """Parameters and optimizer state; BatchNorm's running statistics stay per replica (each
    replica's follow its own batches; a checkpoint holds replica 0's)."""
    return {k: v for k, v in _params(run_dir, step).items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.mark.slow
def test_two_stages_of_two_replicas_resume_as_four_stages_with_the_parameters_they_saved(
    tmp_path,
):
    # The reference is one process: accumulating two batches per step while the replicas
    # did, then one; the pipeline of four stages continues the 2 x 2 run's checkpoint.
    reference, moved = tmp_path / "reference", tmp_path / "moved"
    _one_thread(*RESUMABLE, "--regime", "parallel", "--accumulate", "2", "--max-steps", "8",
                "--out", str(reference))
    _one_thread("--resume", str(reference), "--accumulate", "1", "--max-steps", "16")
    first = torchrun(4, [*RESUMABLE, "--stage-replicas", "2", "--max-steps", "8", "--out",
                         str(moved)])
    assert first.code == 0, first.output
    _assert_same(_trained_state(reference, 8), _trained_state(moved, 8))
    resumed = torchrun(4, ["--resume", str(moved), "--stage-replicas", "1", "--max-steps", "16"])
    assert resumed.code == 0, resumed.output
    assert manifest.latest(moved)[0] == 16
    _assert_same(_trained_state(reference, 16), _trained_state(moved, 16))


@pytest.mark.slow
def test_replica_counts_that_do_not_add_up_to_the_ranks_are_one_line(tmp_path):
    launch = torchrun(4, [*SMALL, "--stage-replicas", "2,1", "--out", str(tmp_path / "r")])
    assert launch.code != 0
    assert launch.output.count("error: --stage-replicas 2,1 needs 3 ranks, the launcher "
                               "started 4") == 1, launch.output
    assert "exitcode  : 2" in launch.output
    assert launch.survivors() == []
