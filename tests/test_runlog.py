"""Tests of the run log: records on disk, appended or replaced, and TensorBoard scalars."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.records import epoch, evaluation, train
from trgl_dist.metrics.records import read_records
from trgl_dist.metrics.runlog import RunLog
from trgl_dist.rundir import METRICS_FILE


def test_records_are_written_one_a_line_and_read_back_equal(tmp_path: Path) -> None:
    records = [train(0, 0, 10, 64), evaluation(0, 0, 0.25), epoch(0, 10, 3.5)]
    with RunLog(tmp_path, tensorboard=False) as log:
        for rec in records:
            log.record(rec)
    assert read_records(tmp_path / METRICS_FILE) == records
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 3


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
    assert [r.step for r in read_records(tmp_path / METRICS_FILE)] == [1, 2, 3]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    with RunLog(tmp_path) as log:
        log.record(train(0, 0, 7, 8))
    assert [r.step for r in read_records(tmp_path / METRICS_FILE)] == [7]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
