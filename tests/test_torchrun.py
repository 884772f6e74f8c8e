"""The real launcher: `torchrun -m trgl_dist.train` end to end, and its failures."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import tomllib

import psutil
import pytest

from tests.launcher import loading_torch, our_output, rank_process, torchrun
from trgl_dist.metrics.records import EvalRecord, TrainRecord, read_records
from trgl_dist.runtime.watchdog import COORDINATOR_SILENCE_S

SMALL = ["--dataset", "synthetic", "--model", "resnet-small", "--width", "8", "--batch-size", "16",
         "--log-every", "2"]


def test_two_stage_pipeline_writes_summary_and_metrics_of_both_stages(tmp_path):
    out = tmp_path / "run"
    # equal-time: rank 0 profiles the split and broadcasts it, under the strict device rules
    flags = ["--modules", "3", "--split", "equal-time", "--plan", "even", "--epochs", "2",
             "--out", str(out)]
    launch = torchrun(2, [*SMALL, *flags])
    assert launch.code == 0, launch.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["regime"] == "pipeline" and summary["failure"] is None
    assert [s["stage"] for s in summary["stages"]] == [0, 1]
    assert [s["modules"] for s in summary["stages"]] == [[0, 1], [2]]
    for stage in summary["stages"]:
        assert abs(stage["busy"] + stage["wait"] - 1.0) < 1e-6 and stage["peak_rss_mb"] > 0
    assert len(summary["modules"]) == 3
    assert all(0 <= m["test_accuracy"] <= 1 for m in summary["modules"])
    records = read_records(out / "metrics.jsonl")
    assert {r.stage for r in records if isinstance(r, TrainRecord)} == {0, 1}
    assert {(r.epoch, r.module) for r in records if isinstance(r, EvalRecord)} == {
        (e, k) for e in (0, 1) for k in range(3)
    }
    assert "Results (pipeline, 3 modules)" in launch.output
    assert (out / "config.toml").exists() and (out / "report.md").exists()
    counts = tomllib.loads((out / "config.toml").read_text())["model"]["split_counts"]
    assert len(counts) == 3 and sum(counts) == 9  # resnet-small's 9 blocks, as measured
    assert launch.survivors() == []


def _stage_trained(out):
    def ready():
        path = out / "metrics.jsonl"
        return path.exists() and any(
            isinstance(r, TrainRecord) and r.stage == 2 for r in read_records(path)
        )

    return ready


LINK_TIMEOUT_S = 8
#: A 3-stage run far longer than any test lets it go.
THREE_STAGES = [*SMALL, "--modules", "3", "--epochs", "50", "--synthetic-train", "2048"]


@pytest.mark.parametrize(
    ("sig", "named"),
    [
        (signal.SIGKILL, ("died", "stage 1 (rank 1) died")),
        (signal.SIGSTOP, ("frozen", "stage 1 (rank 1) stopped responding")),
    ],
)
def test_a_killed_or_frozen_middle_rank_stops_every_process_and_is_named(tmp_path, sig, named):
    out = tmp_path / "run"
    ready = _stage_trained(out)
    signalled_at: list[float] = []

    def signal_rank_1(launcher, elapsed):
        if not ready():
            return False
        victim = rank_process(launcher, 1)
        assert victim is not None
        victim.send_signal(sig)
        signalled_at.append(elapsed)
        return True

    args = [*THREE_STAGES, "--link-timeout", str(LINK_TIMEOUT_S)]
    launch = torchrun(3, [*args, "--out", str(out)], during=signal_rank_1)
    assert signalled_at, launch.output
    assert launch.code != 0
    assert launch.seconds - signalled_at[0] < LINK_TIMEOUT_S + 30, launch.output
    cause, line = named
    assert f"trgl_dist: training failed: {line}" in launch.output, launch.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failure"]["rank"] == 1 and summary["failure"]["cause"] == cause
    assert launch.survivors() == []


def test_loader_workers_stopped_with_their_rank_are_not_the_cause(tmp_path):
    """torchrun answers a dead rank with SIGTERM to every other rank's process group, which
    holds that rank's data-loader workers too: their deaths are part of the stop, not an
    error of stage 0's (which would then be named instead of the dead rank)."""
    out = tmp_path / "run"
    ready = _stage_trained(out)
    stopped: list[int] = []

    def kill_1_and_stop_0(launcher, elapsed):
        if not ready():
            return False
        victim, first = rank_process(launcher, 1), rank_process(launcher, 0)
        assert victim is not None and first is not None
        assert first.children(), "stage 0 has no loader workers"
        victim.send_signal(signal.SIGKILL)
        os.killpg(os.getpgid(first.pid), signal.SIGTERM)
        stopped.append(first.pid)
        return True

    args = [*THREE_STAGES, "--workers", "2", "--link-timeout", str(LINK_TIMEOUT_S)]
    launch = torchrun(3, [*args, "--out", str(out)], during=kill_1_and_stop_0)
    assert stopped, launch.output
    assert "trgl_dist: training failed: stage 1 (rank 1) died" in launch.output, launch.output
    ours = our_output(launch.output)
    assert "Traceback" not in ours and "Exception ignored" not in ours, launch.output
    assert launch.survivors() == []


def test_an_exception_in_a_rank_stops_every_process_and_names_it(tmp_path):
    # A learning rate this large turns the loss into NaN/inf within a few steps; the module
    # that sees it raises, and that is the one failure reported.
    out = tmp_path / "run"
    args = [*SMALL, "--modules", "2", "--epochs", "50", "--lr", "1e12", "--out", str(out)]
    launch = torchrun(2, args)
    assert launch.code != 0
    assert "FloatingPointError: module" in launch.output, launch.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failure"]["cause"] == "exception"
    assert "loss is" in summary["failure"]["message"]
    assert launch.survivors() == []


def test_more_ranks_than_modules_is_one_line_and_exit_2(tmp_path):
    launch = torchrun(3, [*SMALL, "--modules", "2", "--out", str(tmp_path / "r")])
    assert launch.code != 0
    assert launch.output.count("error: more ranks (3) than modules (2)") == 1, launch.output
    assert "exitcode  : 2" in launch.output


def test_a_killed_launcher_takes_every_rank_and_the_coordinator_with_it(tmp_path):
    out = tmp_path / "run"
    ready = _stage_trained(out)

    def kill_torchrun(launcher, elapsed):
        if not ready():
            return False
        launcher.send_signal(signal.SIGKILL)
        return True

    args = THREE_STAGES
    launch = torchrun(3, [*args, "--out", str(out)], during=kill_torchrun, kill_at_end=False)
    try:
        assert launch.code == -signal.SIGKILL
        assert len(launch.seen) >= 4  # three ranks and the coordinator (at least)
        deadline = time.monotonic() + 30
        while launch.survivors() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert launch.survivors() == [], launch.survivors()
        assert "the launcher (pid" in launch.read_rest(), launch.output
    finally:
        launch.kill_survivors()


def _coordinator(launcher):
    for child in launcher.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if "trgl_dist.metrics.coordinator" in " ".join(child.cmdline()):
                return child
    return None


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_lost_coordinator_stops_every_rank_in_one_line(tmp_path, how):
    out = tmp_path / "run"
    ready = _stage_trained(out)
    hit: list = []

    def stop_the_coordinator(launcher, elapsed):
        coordinator = _coordinator(launcher)
        if coordinator is None or not ready():
            return False
        coordinator.send_signal(how)
        hit.append((coordinator, time.monotonic()))
        return True

    args = THREE_STAGES
    launch = torchrun(3, [*args, "--out", str(out)], during=stop_the_coordinator,
                      kill_at_end=False)
    try:
        assert hit
        # the ranks' watchdogs give the coordinator 15 s, then each says so and exits;
        # rank 0 kills a frozen coordinator on its way out: nothing is left running
        assert time.monotonic() - hit[0][1] < COORDINATOR_SILENCE_S + 30
        deadline = time.monotonic() + 30
        while launch.survivors() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert launch.survivors() == [], launch.survivors()
        output = our_output(launch.read_rest())
        assert launch.code != 0, output
        assert "the metrics coordinator has been silent" in output, output
        assert "Traceback" not in output, output
    finally:
        launch.kill_survivors()
        for coordinator, _ in hit:
            with contextlib.suppress(psutil.NoSuchProcess):
                coordinator.kill()


def test_ctrl_c_while_the_ranks_start_is_one_line_and_leaves_nothing_running(tmp_path):
    def interrupt_once_joined(launcher, elapsed):
        ranks = [rank_process(launcher, r) for r in (0, 1)]
        if not all(r is not None and loading_torch(r) for r in ranks) or elapsed < 3:
            return False
        launcher.send_signal(signal.SIGINT)
        return True

    args = [*SMALL, "--modules", "2", "--epochs", "5", "--out", str(tmp_path / "run")]
    launch = torchrun(2, args, during=interrupt_once_joined)
    assert launch.code != 0
    ours = our_output(launch.output)
    assert "Traceback" not in ours, launch.output
    said = [ln for ln in ours.splitlines() if "interrupted" in ln or ln.startswith("error")]
    assert len(said) == 1, launch.output
    assert launch.survivors() == []
