"""Tests of the record schema: every kind round-trips, anything else is refused by field."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.records import end, epoch, error, evaluation, train
from trgl_dist.metrics.records import (
    KINDS,
    RECORD_VERSION,
    CheckpointRecord,
    EvalTally,
    RecordError,
    StageRecord,
    decode,
    encode,
    read_records,
    to_dict,
)

EXAMPLES = [
    train(0, 0, 10, 64),
    train(1, 2, 5, tau=None, lambda_=1.5),
    evaluation(3, 1, 0.75, stage=1),
    epoch(0, 10, 3.5),
    StageRecord(**{k: v for k, v in vars(end(1)).items()}),
    end(0, busy=2.0, cuda_peak_mb=512.0),
    error(1, "peer-lost", 2, "recv failed"),
    CheckpointRecord(step=4, epoch=0, stage=1),
]


def test_every_kind_has_an_example_and_round_trips_through_json() -> None:
    assert {type(rec) for rec in EXAMPLES} == set(KINDS.values())
    for rec in EXAMPLES:
        line = encode(rec)
        assert json.loads(line)["v"] == RECORD_VERSION
        assert decode(json.loads(line)) == rec


def test_a_diverged_loss_stays_visible() -> None:
    rec = decode(json.loads(encode(train(0, 0, 1, loss=math.nan, ce=math.inf))))
    assert math.isnan(rec.loss) and rec.ce == math.inf


def valid() -> dict[str, Any]:
    return to_dict(train(0, 0, 10, 64))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step": "x"}, "step: must be an integer"),
        ({"step": True}, "step: must be an integer"),
        ({"step": -1}, "step: -1 is out of range"),
        ({"step": 10**30}, "out of range"),
        ({"module": 1.5}, "module: must be an integer"),
        ({"accuracy": 1.5}, "accuracy: 1.5 is out of range"),
        ({"accuracy": math.nan}, "accuracy: must be finite"),
        ({"samples": None}, "samples: must not be null"),
        ({"kind": "bogus"}, "unknown record kind 'bogus'"),
        ({"kind": 3}, "unknown record kind 3"),
        ({"v": 2}, "record version 2"),
        ({"v": True}, "record version True"),
        ({"extra": 1}, "unknown field 'extra'"),
    ],
)
def test_a_wrong_field_is_refused_by_name(change: dict[str, Any], message: str) -> None:
    with pytest.raises(RecordError, match=message.replace("(", r"\(")):
        decode({**valid(), **change})


def test_missing_fields_unknown_causes_and_long_messages_are_refused() -> None:
    with pytest.raises(RecordError, match="missing field 'step'"):
        decode({"v": 1, "kind": "epoch", "epoch": 7})
    bad_cause = {**to_dict(error(0, "exception")), "cause": "bored"}
    with pytest.raises(RecordError, match="cause: 'bored' is not one of"):
        decode(bad_cause)
    with pytest.raises(RecordError, match="at most 4096 characters"):
        decode({**to_dict(error(0, "exception")), "message": "x" * 5000})
    with pytest.raises(RecordError, match="a record is a JSON object"):
        decode([1, 2])


def test_reading_a_run_log_skips_what_does_not_decode(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [encode(epoch(0, 1, 2.0)), "", '{"kind": "epoch", "epoch": 7}', '{"v": 1, "kind": "tr']
    path.write_text("\n".join(lines))
    assert read_records(path) == [epoch(0, 1, 2.0)]


def test_a_record_of_an_earlier_release_without_a_version_is_read() -> None:
    old = {k: v for k, v in valid().items() if k != "v"}
    with pytest.raises(RecordError):
        decode(old)
    assert decode(old, versionless=True) == decode(valid())


def test_the_eval_tally_makes_one_record_per_module() -> None:
    tally = EvalTally([4, 5], epoch=2)
    tally.add(0, 30, 12.0)
    tally.add(1, 40, 6.0)
    tally.add(0, 10, 4.0)
    tally.samples = 80
    got = tally.records([7, 7], stage=1)
    assert [(r.module, r.accuracy, r.loss, r.samples, r.step) for r in got] == [
        (4, 0.5, 0.2, 80, 7),
        (5, 0.5, 0.075, 80, 7),
    ]


def test_the_record_module_does_not_import_torch() -> None:
    code = (
        "import sys, trgl_dist.metrics.coordinator, trgl_dist.metrics.records; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
