"""Tests of the run log: records on disk, TensorBoard scalars, summary and failure diagnosis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trgl_dist.metrics.runlog import (
    METRICS_FILE,
    SUMMARY_FILE,
    RunLog,
    diagnose_failure,
    read_metrics,
    summarize,
    write_summary,
)


def train(module: int, epoch: int, step: int, samples: int, stage: int = 0) -> dict[str, Any]:
    return {
        "kind": "train",
        "step": step,
        "epoch": epoch,
        "module": module,
        "stage": stage,
        "loss": 1.5,
        "ce": 1.25,
        "transport": 0.5,
        "tau": 1.0,
        "lambda": None,
        "accuracy": 0.5,
        "samples": samples,
    }


def evaluation(module: int, epoch: int, accuracy: float) -> dict[str, Any]:
    kind = {"kind": "eval", "step": 100 * (epoch + 1), "epoch": epoch, "module": module}
    return {**kind, "accuracy": accuracy, "loss": 1.0, "samples": 1000}


def end(stage: int, busy: float, wait_in: float, wait_out: float, rate: float) -> dict[str, Any]:
    return {
        "kind": "end",
        "step": 200,
        "epoch": 1,
        "stage": stage,
        "modules": [2 * stage, 2 * stage + 1],
        "busy_s": busy,
        "wait_in_s": wait_in,
        "wait_out_s": wait_out,
        "samples": 2000,
        "samples_per_s": rate,
        "inbox_depth": 0,
        "bytes_sent": 1024 * stage,
        "peak_rss_mb": 100.0 + stage,
        "peak_tensor_mb": 10.0 + stage,
        "staleness_mean": None,
    }


def error(stage: int, cause: str, peer: int | None, message: str = "") -> dict[str, Any]:
    where = {"kind": "error", "step": -1, "epoch": -1, "stage": stage, "rank": stage}
    return {**where, "message": message, "cause": cause, "peer": peer}


def test_records_round_trip_and_numpy_scalars_become_json(tmp_path: Path) -> None:
    records = [
        train(0, 0, 10, 64),
        evaluation(0, 0, 0.25),
        {"kind": "epoch", "step": 10, "epoch": 0, "seconds": 3.5},
    ]
    with RunLog(tmp_path, tensorboard=False) as log:
        for rec in records:
            log.record(rec)
        log.record(
            {
                "kind": "stage",
                "step": 1,
                "epoch": 0,
                "stage": 0,
                "busy_s": np.float32(0.5),
                "inbox_depth": np.int64(3),
            }
        )
    back = read_metrics(tmp_path / METRICS_FILE)
    assert back[:3] == records
    assert back[3]["busy_s"] == 0.5 and back[3]["inbox_depth"] == 3


def test_read_metrics_skips_a_line_truncated_by_a_crash(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text('{"kind": "epoch", "step": 1, "epoch": 0, "seconds": 2.0}\n\n{"kind": "tr')
    assert read_metrics(path) == [{"kind": "epoch", "step": 1, "epoch": 0, "seconds": 2.0}]


def test_tensorboard_scalars_are_named_by_one_based_module(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLog(tmp_path) as log:
        log.record(train(0, 0, 10, 64))
        log.record(train(1, 0, 10, 64, stage=1))
        log.record(evaluation(1, 0, 0.75))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"module1/train_loss", "module2/train_transport", "module2/eval_accuracy"} <= tags
    assert "module1/train_lambda" not in tags  # null values are not scalars
    (point,) = events.Scalars("module2/eval_accuracy")
    assert point.step == 100 and point.value == pytest.approx(0.75)


def test_append_keeps_earlier_records_and_a_fresh_log_replaces_them(tmp_path: Path) -> None:
    with RunLog(tmp_path) as log:
        log.record(train(0, 0, 1, 8))
        log.record(train(0, 0, 2, 8))
    with RunLog(tmp_path, append=True) as log:
        log.record(train(0, 1, 3, 8))
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_FILE)] == [1, 2, 3]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    with RunLog(tmp_path) as log:
        log.record(train(0, 0, 7, 8))
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_FILE)] == [7]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1


def pipeline_records() -> list[dict[str, Any]]:
    return [
        train(0, 0, 10, 100),
        train(1, 0, 10, 100),
        evaluation(0, 0, 0.5),
        evaluation(1, 0, 0.625),
        {"kind": "epoch", "step": 10, "epoch": 0, "seconds": 10.0},
        evaluation(0, 1, 0.5625),
        evaluation(1, 1, 0.5625),
        {"kind": "epoch", "step": 20, "epoch": 1, "seconds": 12.0},
        {"kind": "epoch", "step": 20, "epoch": 1, "seconds": 11.0},  # resumed: last one wins
        end(0, busy=6.0, wait_in=0.0, wait_out=2.0, rate=50.0),
        end(1, busy=3.0, wait_in=1.0, wait_out=0.0, rate=40.0),
    ]


def test_summarize_a_pipeline_run_exactly() -> None:
    summary = summarize(pipeline_records(), regime="pipeline", num_modules=2, extra={"seed": 7})
    stage = {"staleness_mean": None}
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


def test_summarize_one_process_sequential_counts_each_epochs_data_pass() -> None:
    # Sequential: epoch 0 trains module 0 only, epoch 1 module 1 only; 200 samples each.
    records = [train(0, 0, 1, 100), train(0, 0, 2, 100), train(1, 1, 3, 120), train(1, 1, 4, 80)]
    records += [{"kind": "epoch", "step": 2, "epoch": 0, "seconds": 8.0}]
    records += [{"kind": "epoch", "step": 4, "epoch": 1, "seconds": 12.0}]
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


def test_an_exception_is_the_root_cause_over_peer_lost_reports() -> None:
    records = [error(0, "peer-lost", 1, "lost 1"), error(1, "exception", None, "ValueError: boom")]
    failure = diagnose_failure(records)
    assert failure == {
        "stage": 1,
        "rank": 1,
        "cause": "exception",
        "message": "ValueError: boom",
        "description": "stage 1 (rank 1) raised: ValueError: boom",
    }
    assert summarize(records, regime="pipeline", num_modules=2)["failure"] == failure


def test_a_silent_peer_named_by_peer_lost_is_the_dead_rank() -> None:
    # Rank 2 was SIGKILLed: rank 1 and rank 3 lose it; rank 0 then loses rank 1, which reported.
    records = [error(1, "peer-lost", 2), error(3, "peer-lost", 2), error(0, "peer-lost", 1)]
    failure = diagnose_failure(records)
    assert failure is not None
    assert (failure["rank"], failure["stage"], failure["cause"]) == (2, 2, "died")
    assert failure["description"] == "stage 2 (rank 2) died without reporting (killed?)"
    assert failure["reported_by"] == [0, 1, 3]


def test_a_rank_silent_among_interrupted_ones_is_the_dead_rank() -> None:
    # Under torchrun the survivors are SIGTERMed before they notice the lost peer.
    records = [error(0, "interrupted", None), error(2, "interrupted", None)]
    failure = diagnose_failure(records, world_size=3)
    assert failure is not None
    assert (failure["rank"], failure["cause"]) == (1, "died")
    assert diagnose_failure(records)["cause"] == "interrupted"  # world size unknown


def test_a_peer_that_ended_is_not_blamed() -> None:
    records = [end(2, 1.0, 0.0, 0.0, 1.0), error(1, "peer-lost", 2, "recv failed")]
    failure = diagnose_failure(records)
    assert failure is not None
    assert (failure["rank"], failure["cause"]) == (1, "peer-lost")
    assert failure["description"] == "stage 1 (rank 1) peer-lost: recv failed"
    assert diagnose_failure(pipeline_records()) is None


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
