"""Tests of the failure diagnosis: which rank's report is the root cause."""

from __future__ import annotations

from tests.records import end, error
from tests.test_summary import pipeline_records
from trgl_dist.layout import Layout
from trgl_dist.metrics.failure import Failure, diagnose_failure
from trgl_dist.metrics.summary import summarize


def test_an_exception_is_the_root_cause_over_peer_lost_reports() -> None:
    records = [error(0, "peer-lost", 1, "lost 1"), error(1, "exception", None, "ValueError: boom")]
    failure = diagnose_failure(records)
    assert failure == Failure(
        1, 1, "exception", "stage 1 (rank 1) raised: ValueError: boom", "ValueError: boom"
    )
    assert summarize(records, regime="pipeline", num_modules=2, failure=failure)["failure"] == {
        "stage": 1,
        "rank": 1,
        "cause": "exception",
        "message": "ValueError: boom",
        "description": "stage 1 (rank 1) raised: ValueError: boom",
        "reported_by": [],
    }


def test_a_silent_peer_named_by_peer_lost_is_the_dead_rank() -> None:
    # Rank 2 was SIGKILLed: rank 1 and rank 3 lose it; rank 0 then loses rank 1, which reported.
    records = [error(1, "peer-lost", 2), error(3, "peer-lost", 2), error(0, "peer-lost", 1)]
    failure = diagnose_failure(records)
    assert failure is not None
    assert (failure.rank, failure.stage, failure.cause) == (2, 2, "died")
    assert failure.description == "stage 2 (rank 2) died without reporting (killed?)"
    assert failure.reported_by == [0, 1, 3]


def test_a_rank_silent_among_interrupted_ones_is_the_dead_rank() -> None:
    # Under torchrun the survivors are SIGTERMed before they notice the lost peer.
    records = [error(0, "interrupted"), error(2, "interrupted")]
    failure = diagnose_failure(records, Layout((1, 1, 1)))
    assert failure is not None
    assert (failure.rank, failure.cause) == (1, "died")
    unknown = diagnose_failure(records)  # world size unknown
    assert unknown is not None and unknown.cause == "interrupted"


def test_a_peer_that_ended_is_not_blamed() -> None:
    records = [end(2), error(1, "peer-lost", 2, "recv failed")]
    failure = diagnose_failure(records)
    assert failure is not None
    assert (failure.rank, failure.cause) == (1, "peer-lost")
    assert failure.description == "stage 1 (rank 1) peer-lost: recv failed"
    assert diagnose_failure(pipeline_records()) is None
