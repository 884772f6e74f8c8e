"""The real launcher: `torchrun -m trgl_dist.train` end to end, and its failures."""

from __future__ import annotations

import json
import signal

from tests.launcher import rank_process, torchrun
from trgl_dist.metrics.records import EvalRecord, TrainRecord, read_records

SMALL = ["--dataset", "synthetic", "--model", "resnet-small", "--width", "8", "--batch-size", "16",
         "--log-every", "2"]


def test_two_stage_pipeline_writes_summary_and_metrics_of_both_stages(tmp_path):
    out = tmp_path / "run"
    launch = torchrun(2, [*SMALL, "--modules", "3", "--epochs", "2", "--out", str(out)])
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
    assert launch.survivors() == []


def _stage_trained(out):
    def ready():
        path = out / "metrics.jsonl"
        return path.exists() and any(
            isinstance(r, TrainRecord) and r.stage == 2 for r in read_records(path)
        )

    return ready


def test_sigkill_of_a_rank_stops_every_process_and_names_it(tmp_path):
    out = tmp_path / "run"
    ready = _stage_trained(out)
    killed_at: list[float] = []

    def kill_rank_1(launcher, elapsed):
        if not ready():
            return False
        victim = rank_process(launcher, 1)
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        killed_at.append(elapsed)
        return True

    args = [*SMALL, "--modules", "3", "--epochs", "50", "--synthetic-train", "2048"]
    launch = torchrun(3, [*args, "--out", str(out)], during=kill_rank_1)
    assert killed_at, launch.output
    assert launch.code != 0
    assert launch.seconds - killed_at[0] < 30
    assert "stage 1 (rank 1) died" in launch.output, launch.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failure"]["rank"] == 1 and summary["failure"]["cause"] == "died"
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
