"""The multi-process test helper itself: a rank killed from outside, the hard deadline, errors."""

from __future__ import annotations

import threading
import time

from tests.distributed import run_workers
from tests.test_link import WAIT_S, receiver
from trgl_dist.runtime.link import PeerFailure
from trgl_dist.runtime.topology import Topology


def wait_for_rank_0(topology: Topology) -> str:
    if topology.is_first:
        time.sleep(WAIT_S)  # killed from outside long before this ends
        return "not killed"
    _, inbox = receiver(topology, 1)
    try:
        inbox.get()
    except PeerFailure as exc:
        return str(exc)
    return "no failure"


def test_kill_rank_from_outside_is_noticed_by_the_receiver() -> None:
    results = run_workers(wait_for_rank_0, 2, deadline_s=60, kill_rank=(0, 1.0))
    assert results[0].exitcode == -9 and not results[0].timed_out
    assert results[1].exitcode == 0, results[1].error
    assert results[1].value.startswith("stage 0 (rank 0) failed: RuntimeError")


def hang(topology: Topology) -> None:
    threading.Event().wait()  # forever


def test_deadline_kills_and_reports_stragglers() -> None:
    # Whether the deadline strikes in start-up or in fn, every rank is a straggler.
    results = run_workers(hang, 2, deadline_s=3)
    assert [(r.timed_out, r.exitcode, r.value) for r in results] == [(True, -9, None)] * 2


def raise_on_rank_0(topology: Topology) -> None:
    if topology.is_first:
        raise KeyError("on purpose")


def test_worker_error_text_and_exit_code_come_back() -> None:
    results = run_workers(raise_on_rank_0, 2, deadline_s=60)
    assert results[0].exitcode == 1 and "KeyError: 'on purpose'" in results[0].error
    assert results[1].exitcode == 0 and results[1].error == ""
