"""Tests of summary.json: exact figures from known records, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.records import end, epoch, evaluation, train
from trgl_dist.metrics.records import Record, StageRecord
from trgl_dist.metrics.summary import summarize, write_summary
from trgl_dist.rundir import SUMMARY_FILE


def pipeline_records() -> list[Record]:
    return [
        train(0, 0, 10, 100),
        train(1, 0, 10, 100),
        evaluation(0, 0, 0.5),
        evaluation(1, 0, 0.625),
        epoch(0, 10, 10.0),
        evaluation(0, 1, 0.5625),
        evaluation(1, 1, 0.5625),
        epoch(1, 20, 12.0),
        epoch(1, 20, 11.0),  # resumed: the last one wins
        end(0, busy=6.0, wait_in=0.0, wait_out=2.0, rate=50.0),
        end(1, busy=3.0, wait_in=1.0, wait_out=0.0, rate=40.0),
    ]


def test_replicas_of_a_stage_add_their_samples_and_average_their_shares() -> None:
    records: list[Record] = [
        end(0, busy=6.0, wait_out=2.0, rate=50.0, step_ms=40.0, step_peak_mb=30.0),
        end(0, busy=3.0, wait_out=1.0, rate=30.0, step_ms=44.0, step_peak_mb=31.5,
            peak_rss_mb=120.0, rank=1),
        end(1, busy=3.0, wait_in=1.0, rate=80.0, rank=2),
    ]
    (first, second) = summarize(records, regime="pipeline", num_modules=4)["stages"]
    assert first["replicas"] == 2 and second["replicas"] == 1
    assert first["samples_per_s"] == 80.0  # 50 + 30: the stage's throughput
    assert first["busy"] == 0.75 and first["wait_out"] == 0.25  # both 3/4
    assert first["step_ms"] == 42.0 and first["step_peak_mb"] == 31.5
    assert first["peak_rss_mb"] == 120.0  # the largest replica
    assert second["samples_per_s"] == 80.0 and second["step_ms"] is None


def test_summarize_a_pipeline_run_exactly() -> None:
    summary = summarize(pipeline_records(), regime="pipeline", num_modules=2, extra={"seed": 7})
    stage = {"staleness_mean": None, "cuda_peak_mb": None, "replicas": 1}
    stage |= {"step_ms": None, "step_peak_mb": None}
    assert summary == {
        "regime": "pipeline",
        "num_modules": 2,
        "modules": [
            {"module": 0, "test_accuracy": 0.5625, "best_test_accuracy": 0.5625},
            {"module": 1, "test_accuracy": 0.5625, "best_test_accuracy": 0.625},
        ],
        "last_module_accuracy": 0.5625,
        "best_module": 0,  # a tie goes to the shallower module
        "best_module_accuracy": 0.5625,
        "epoch_times": [10.0, 11.0],
        "samples_per_s": 40.0,  # the slowest stage
        "stages": [
            {
                **stage,
                "stage": 0,
                "modules": [0, 1],
                "busy": 0.75,
                "wait": 0.25,
                "wait_in": 0.0,
                "wait_out": 0.25,
                "samples_per_s": 50.0,
                "peak_rss_mb": 100.0,
                "peak_tensor_mb": 10.0,
                "bytes_sent": 0,
            },
            {
                **stage,
                "stage": 1,
                "modules": [2, 3],
                "busy": 0.75,
                "wait": 0.25,
                "wait_in": 0.25,
                "wait_out": 0.0,
                "samples_per_s": 40.0,
                "peak_rss_mb": 101.0,
                "peak_tensor_mb": 11.0,
                "bytes_sent": 1024,
            },
        ],
        "failure": None,
        "seed": 7,
    }


def test_each_stages_highest_epoch_cuda_peak_reaches_the_summary() -> None:
    # The stage resets the peak every epoch: the run's peak is the highest of its records.
    epoch_1 = StageRecord(**{**vars(end(0)), "cuda_peak_mb": 2000.0})
    records = [epoch_1, end(0, cuda_peak_mb=1234.5), end(1, cuda_peak_mb=99.0)]
    stages = summarize(records, regime="pipeline", num_modules=4)["stages"]
    assert [s["cuda_peak_mb"] for s in stages] == [2000.0, 99.0]


def test_summarize_one_process_sequential_counts_each_epochs_data_pass() -> None:
    # Sequential: epoch 0 trains module 0 only, epoch 1 module 1 only; 200 samples each.
    records: list[Record] = [
        train(0, 0, 1, 100),
        train(0, 0, 2, 100),
        train(1, 1, 3, 120),
        train(1, 1, 4, 80),
        epoch(0, 2, 8.0),
        epoch(1, 4, 12.0),
    ]
    summary = summarize(records, regime="sequential", num_modules=3)
    assert summary["samples_per_s"] == 400 / 20
    assert summary["stages"] == [] and summary["epoch_times"] == [8.0, 12.0]
    assert summary["modules"][2] == {"module": 2, "test_accuracy": None, "best_test_accuracy": None}
    assert summary["best_module"] is None and summary["last_module_accuracy"] is None


def test_extra_overrides_computed_keys() -> None:
    summary = summarize(
        pipeline_records(), regime="parallel", num_modules=2, extra={"samples_per_s": 9.0}
    )
    assert summary["samples_per_s"] == 9.0


def test_write_summary_is_atomic(tmp_path: Path) -> None:
    write_summary(tmp_path, {"regime": "parallel", "modules": [1, 2]})
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == {
        "regime": "parallel",
        "modules": [1, 2],
    }
    with pytest.raises(TypeError):
        write_summary(tmp_path, {"regime": object()})  # fails half-way through serializing
    # The old summary is intact and no temporary file is left behind.
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["regime"] == "parallel"
    assert [p.name for p in tmp_path.iterdir()] == [SUMMARY_FILE]
