"""Tests of the metrics coordinator and client with real processes and real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
import zmq.utils.monitor

from trgl_dist.errors import CoordinatorError
from trgl_dist.metrics.client import MetricsClient, signature
from trgl_dist.metrics.collector import CoordinatorSettings, RunShape
from trgl_dist.metrics.coordinator import (
    CoordinatorJob,
    _connect_address,
    start_coordinator,
    stop_coordinator,
)
from trgl_dist.metrics.failure import NodeRanks
from trgl_dist.metrics.records import ErrorRecord, TrainRecord, read_records, to_dict

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 120.0  # a hang guard only: every wait below ends much sooner when things work
FAST = CoordinatorSettings(grace_s=0.5, progress_interval_s=0.1, tensorboard=False)
SECRET = bytes(range(32))

# A rank stand-in: pushes the JSON records given on the command line, then closes.
SENDER = """
import json, sys
from trgl_dist.metrics.client import MetricsClient, signature
from trgl_dist.metrics.records import decode
client = MetricsClient(sys.argv[1], rank=int(sys.argv[2]), secret=bytes.fromhex(sys.argv[3]))
for rec in json.loads(sys.argv[4]):
    assert client.send(decode(rec))
client.close()
"""

# Signs and pushes one JSON object as it is, valid record or not.
SENDER_RAW = """
import sys, zmq
from trgl_dist.metrics.client import signature
rank, secret, payload = sys.argv[2].encode(), bytes.fromhex(sys.argv[3]), sys.argv[4].encode()
context = zmq.Context()
sock = context.socket(zmq.PUSH)
sock.connect(sys.argv[1])
sock.send_multipart([rank, signature(secret, rank, payload), payload])
sock.close(linger=5000)
context.term()
"""

# Starts a coordinator, says where it is, then waits to be killed.
PARENT = """
import json, sys, time
from pathlib import Path
from trgl_dist.metrics.collector import CoordinatorSettings, RunShape
from trgl_dist.metrics.coordinator import CoordinatorJob, start_coordinator
settings = CoordinatorSettings(grace_s=0.5, tensorboard=False)
job = CoordinatorJob(Path(sys.argv[1]), RunShape(2, 2, "pipeline"), b"s" * 32)
process, addresses = start_coordinator(job, settings)
Path(sys.argv[2]).write_text(json.dumps({"pid": process.pid, "address": addresses.records}))
time.sleep(600)
"""


def python(script: str, *args: str, **popen: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=env, **popen)


def send_from_child(
    address: str, records: list[dict[str, Any]], rank: int | None = None, secret: bytes = SECRET
) -> None:
    """Send ``records`` as rank ``rank`` (default: the first record's stage)."""
    rank = records[0]["stage"] if rank is None else rank
    child = python(SENDER, address, str(rank), secret.hex(), json.dumps(records))
    try:
        assert child.wait(DEADLINE_S) == 0
    finally:
        child.kill()


def train(stage: int, module: int, step: int) -> dict[str, Any]:
    return {
        "v": 1,
        "kind": "train",
        "step": step,
        "epoch": 0,
        "module": module,
        "stage": stage,
        "loss": 1.0,
        "ce": 0.9,
        "transport": 0.2,
        "tau": 0.5,
        "lambda": None,
        "accuracy": 0.5,
        "samples": 16,
    }


def end(stage: int) -> dict[str, Any]:
    return {
        "v": 1,
        "kind": "end",
        "step": 3,
        "epoch": 0,
        "stage": stage,
        "rank": stage,
        "replica": 0,
        "modules": [2 * stage, 2 * stage + 1],
        "busy_s": 3.0,
        "wait_in_s": 1.0,
        "wait_out_s": 0.0,
        "samples": 64,
        "samples_per_s": 16.0,
        "inbox_depth": 0,
        "bytes_sent": 4096,
        "peak_rss_mb": 200.0,
        "peak_tensor_mb": 5.0,
        "staleness_mean": None,
        "cuda_peak_mb": None,
        "step_ms": 40.0 + stage,
        "step_peak_mb": 12.5,
        "batches_sent": 0,
        "seconds_sending": 0.0,
        "batches_received": 0,
        "bytes_received": 0,
        "seconds_waiting_on_put": 0.0,
    }


def error(stage: int, cause: str, peer: int | None, message: str) -> dict[str, Any]:
    where = {"v": 1, "kind": "error", "step": -1, "epoch": -1, "stage": stage, "rank": stage}
    return {**where, "message": message, "cause": cause, "peer": peer}


def stage_records(stage: int) -> list[dict[str, Any]]:
    records = [
        train(stage, module, step) for step in range(4) for module in (2 * stage, 2 * stage + 1)
    ]
    for module in (2 * stage, 2 * stage + 1):
        where = {"v": 1, "kind": "eval", "step": 3, "epoch": 0, "module": module, "stage": stage}
        records.append({**where, "accuracy": 0.5 + 0.1 * module, "loss": 1.0, "samples": 10})
    return [*records, end(stage)]


@pytest.fixture
def coordinators() -> Iterator[list[Any]]:
    """Started coordinators, killed at the end whatever happened."""
    started: list[Any] = []
    yield started
    for process in started:
        stop_coordinator(process, timeout_s=0)


watches: list[str] = []  # the broadcast address of each coordinator started by ``start``


def start(
    run_dir: Path,
    started: list[Any],
    world_size: int,
    settings: CoordinatorSettings = FAST,
    silence_timeout_s: float | None = None,
    **job: Any,
) -> str:
    shape = RunShape(world_size, 2 * world_size, "pipeline", silence_timeout_s)
    process, addresses = start_coordinator(CoordinatorJob(run_dir, shape, SECRET, **job), settings)
    started.append(process)
    watches.append(addresses.watch)
    return addresses.records


def exit_code(started: list[Any]) -> int | None:
    process = started[-1]
    process.join(DEADLINE_S)
    return process.exitcode


def summary_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def test_two_stages_that_end_give_a_complete_run_directory(
    tmp_path: Path, coordinators: list[Any], capfd: pytest.CaptureFixture[str]
) -> None:
    settings = CoordinatorSettings(progress_interval_s=0.1)  # with TensorBoard
    address = start(tmp_path, coordinators, world_size=2, settings=settings, extra={"seed": 3})
    for stage in (0, 1):
        send_from_child(address, stage_records(stage))
    assert exit_code(coordinators) == 0
    records = [to_dict(r) for r in read_records(tmp_path / "metrics.jsonl")]
    assert sorted(json.dumps(r, sort_keys=True) for r in records) == sorted(
        json.dumps(r, sort_keys=True) for r in stage_records(0) + stage_records(1)
    )
    summary = summary_of(tmp_path)
    assert [s["stage"] for s in summary["stages"]] == [0, 1]
    assert summary["stages"][1]["busy"] == 0.75 and summary["failure"] is None
    assert summary["best_module"] == 3 and summary["seed"] == 3
    assert summary["coordinator"] == {"received": len(records), "malformed": 0, "rejected": {}}
    assert (tmp_path / "report.md").exists() and list((tmp_path / "tb").glob("events.*"))
    assert "Results (pipeline, 4 modules)" in capfd.readouterr().out


def wait_for_disconnect(monitor: Any) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        event = zmq.utils.monitor.recv_monitor_message(monitor) if monitor.poll(100) else {}
        if event.get("event") == zmq.EVENT_DISCONNECTED:
            return
    raise AssertionError("the coordinator never dropped the oversized sender")


def test_malformed_and_oversized_messages_are_counted_not_fatal(
    tmp_path: Path, coordinators: list[Any]
) -> None:
    address = start(tmp_path, coordinators, world_size=1)
    context = zmq.Context()
    try:
        rogue = context.socket(zmq.PUSH)
        monitor = rogue.get_monitor_socket()
        rogue.connect(address)
        rogue.send(b"x" * (2 << 20))  # over the 1 MiB limit: libzmq drops its sender
        wait_for_disconnect(monitor)
        sender = context.socket(zmq.PUSH)
        sender.connect(address)
        for raw in (b"not json", b"[1, 2]", b'{"no": "kind"}', b"\xff\xfe", b"[" * 100_000):
            sender.send(raw)
        for record in (train(0, 0, 0), end(0)):  # same connection: they arrive after the junk
            payload = json.dumps(record).encode()
            sender.send_multipart([b"0", signature(SECRET, b"0", payload), payload])
        assert exit_code(coordinators) == 0
    finally:
        context.destroy(linger=0)
    stats = summary_of(tmp_path)["coordinator"]
    assert (stats["received"], stats["malformed"]) == (2, 5)
    assert [r.kind for r in read_records(tmp_path / "metrics.jsonl")] == ["train", "end"]


def test_only_the_runs_ranks_speak_and_only_for_themselves(
    tmp_path: Path, coordinators: list[Any]
) -> None:
    address = start(tmp_path, coordinators, world_size=2)
    forged = [
        (train(0, 0, 0), 0, b"x" * 32),  # not signed with the run's secret
        (error(0, "exception", None, "forged"), 1, SECRET),  # rank 1 speaking for rank 0
        (end(0), 1, SECRET),  # an end record for another rank
        (train(1, 9, 0), 1, SECRET),  # a module the run does not have (4 modules)
        (train(0, 0, 0), 5, SECRET),  # a rank outside the run
        ({"v": 1, "kind": "epoch", "step": 1, "epoch": 0, "stage": 1, "seconds": 1.0}, 1, SECRET),
        ({"v": 1, "kind": "epoch", "epoch": 7}, 0, SECRET),  # fields missing
    ]
    for record, rank, secret in forged:
        child = python(SENDER_RAW, address, str(rank), secret.hex(), json.dumps(record))
        assert child.wait(DEADLINE_S) == 0
    send_from_child(address, stage_records(0))
    send_from_child(address, stage_records(1))
    assert exit_code(coordinators) == 0
    summary = summary_of(tmp_path)
    assert summary["failure"] is None and summary["coordinator"]["malformed"] == len(forged)
    records = read_records(tmp_path / "metrics.jsonl")
    assert len(records) == len(stage_records(0)) + len(stage_records(1))
    assert all(getattr(r, "stage", 0) in (0, 1) and r.kind != "error" for r in records)


def a_train_record(step: int) -> TrainRecord:
    fields = {k: v for k, v in train(0, 0, step).items() if k not in ("v", "kind", "lambda")}
    return TrainRecord(**fields, lambda_=None)


def test_client_refuses_an_oversized_record_without_sending_it() -> None:
    client = MetricsClient(
        "tcp://127.0.0.1:9", rank=0, secret=SECRET, linger_ms=0, max_message_bytes=1000
    )
    big = ErrorRecord(step=1, epoch=0, stage=0, rank=0, message="x" * 1000)
    try:
        assert not client.send(big)
        assert client.send(a_train_record(1))
        assert (client.oversized, client.sent, client.dropped) == (1, 1, 0)
    finally:
        client.close()


def test_an_exception_is_named_as_the_failure(
    tmp_path: Path, coordinators: list[Any], capfd: pytest.CaptureFixture[str]
) -> None:
    address = start(tmp_path, coordinators, world_size=2)
    send_from_child(address, [train(1, 2, 0), error(1, "exception", None, "ValueError: boom")])
    send_from_child(address, [error(0, "peer-lost", 1, "recv from rank 1 failed")])
    assert exit_code(coordinators) == 1
    failure = summary_of(tmp_path)["failure"]
    assert (failure["stage"], failure["rank"], failure["cause"]) == (1, 1, "exception")
    line = "trgl_dist: training failed: stage 1 (rank 1) raised: ValueError: boom"
    assert line in capfd.readouterr().err.splitlines()


def test_a_rank_named_by_peer_lost_that_never_reported_died(
    tmp_path: Path, coordinators: list[Any], capfd: pytest.CaptureFixture[str]
) -> None:
    address = start(tmp_path, coordinators, world_size=3)
    # Rank 2 was killed: rank 1 loses it; rank 0 then loses rank 1, which did report.
    send_from_child(address, [error(1, "peer-lost", 2, "recv from rank 2 failed")])
    send_from_child(address, [error(0, "peer-lost", 1, "send to rank 1 failed")])
    assert exit_code(coordinators) == 1  # after the grace period: rank 2 never reports
    failure = summary_of(tmp_path)["failure"]
    assert (failure["stage"], failure["rank"], failure["cause"]) == (2, 2, "died")
    line = "trgl_dist: training failed: stage 2 (rank 2) died without reporting (killed?)"
    assert line in capfd.readouterr().err.splitlines()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_coordinator_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    info = tmp_path / "coordinator.json"
    parent = python(PARENT, str(tmp_path / "run"), str(info), stdout=subprocess.DEVNULL)
    pid = None
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not info.exists() and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = json.loads(info.read_text())["pid"]
        parent.send_signal(signal.SIGKILL)
        parent.wait(DEADLINE_S)
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(pid)
        failure = summary_of(tmp_path / "run")["failure"]
        assert (failure["rank"], failure["cause"]) == (0, "died")
    finally:
        parent.kill()
        if pid is not None and not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_flushes_and_exits(tmp_path: Path, coordinators: list[Any]) -> None:
    address = start(tmp_path, coordinators, world_size=2)
    send_from_child(address, [train(0, 0, 0)])
    # The record is on disk once the coordinator has it: wait for that, then stop it.
    deadline = time.monotonic() + DEADLINE_S
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    coordinators[-1].terminate()  # one SIGTERM: gather for the grace period, then fail
    assert exit_code(coordinators) == 1
    assert summary_of(tmp_path)["failure"]["cause"] == "interrupted"
    assert [r.kind for r in read_records(tmp_path / "metrics.jsonl")] == ["train"]


def free_port() -> int:
    context = zmq.Context()
    try:
        sock = context.socket(zmq.PULL)
        return sock.bind_to_random_port("tcp://127.0.0.1")
    finally:
        context.destroy(linger=0)


def test_send_never_blocks_when_nobody_listens() -> None:
    client = MetricsClient(
        f"tcp://127.0.0.1:{free_port()}", rank=0, secret=SECRET, hwm=1000, linger_ms=0
    )
    record = a_train_record(1)
    try:
        accepted = [client.send(record) for i in range(100_000)]
    finally:
        client.close()
    assert client.sent == sum(accepted) and client.sent + client.dropped == 100_000
    assert 0 < client.sent <= 2000 and client.dropped >= 98_000


def test_binding_a_port_in_use_is_a_clear_error(tmp_path: Path, coordinators: list[Any]) -> None:
    context = zmq.Context()
    try:
        taken = context.socket(zmq.PULL)
        port = taken.bind_to_random_port("tcp://127.0.0.1")
        message = f"cannot bind tcp://127.0.0.1:{port}: Address already in use"
        with pytest.raises(CoordinatorError, match=message):
            start(tmp_path, coordinators, world_size=1, bind=f"tcp://127.0.0.1:{port}")
    finally:
        context.destroy(linger=0)


def test_a_wildcard_bind_is_reached_through_the_given_host() -> None:
    assert _connect_address("tcp://0.0.0.0:5555", "node0") == "tcp://node0:5555"
    assert _connect_address("tcp://0.0.0.0:5555", None) == "tcp://127.0.0.1:5555"
    assert _connect_address("tcp://10.0.0.7:5555", "node0") == "tcp://10.0.0.7:5555"


def test_a_silent_rank_is_frozen_and_every_rank_is_told_to_abort(
    tmp_path: Path, coordinators: list[Any], capfd: pytest.CaptureFixture[str]
) -> None:
    address = start(tmp_path, coordinators, world_size=2, silence_timeout_s=2.0)
    context = zmq.Context()
    try:
        listener = context.socket(zmq.SUB)
        listener.setsockopt(zmq.SUBSCRIBE, b"")
        listener.connect(watches[-1])
        client = MetricsClient(address, rank=0, secret=SECRET)
        heard: list[list[bytes]] = []
        deadline = time.monotonic() + DEADLINE_S
        # Rank 0 keeps beating; rank 1 never says anything.
        while coordinators[-1].is_alive() and time.monotonic() < deadline:
            client.heartbeat()
            if listener.poll(200):
                heard.append(listener.recv_multipart())
        client.close()
        while listener.poll(500):
            heard.append(listener.recv_multipart())
    finally:
        context.destroy(linger=0)
    assert exit_code(coordinators) == 1
    failure = summary_of(tmp_path)["failure"]
    assert (failure["rank"], failure["cause"]) == (1, "frozen")
    assert [b"alive"] in heard
    (abort,) = [frames for frames in heard if frames[0] == b"abort"]
    assert abort[2:] == [b"1", b"frozen"] and b"stopped responding" in abort[1]
    line = "trgl_dist: training failed: stage 1 (rank 1) stopped responding: nothing heard"
    assert any(x.startswith(line) for x in capfd.readouterr().err.splitlines())


@pytest.fixture
def stopped_rank() -> Iterator[subprocess.Popen[bytes]]:
    """A stand-in for a SIGSTOPped rank 1: this process's child, as a rank is its launcher's."""
    child = subprocess.Popen(["sleep", "600"])
    child.send_signal(signal.SIGSTOP)
    yield child
    child.kill()
    child.wait()


def test_a_silent_rank_on_the_coordinators_node_is_killed_when_judged_frozen(
    tmp_path: Path, coordinators: list[Any]
) -> None:
    """Silent for the timeout, stopped or not (a stuck process), it is judged frozen and
    killed; a stopped one would otherwise hold the launcher for its grace period."""
    silent = subprocess.Popen(["sleep", "600"])  # running, but never heard from
    try:
        node = NodeRanks({1: silent.pid}, launcher_pid=os.getpid())
        address = start(tmp_path, coordinators, world_size=2, silence_timeout_s=2.0, node=node)
        client = MetricsClient(address, rank=0, secret=SECRET)
        deadline = time.monotonic() + DEADLINE_S
        while coordinators[-1].is_alive() and time.monotonic() < deadline:
            client.heartbeat()  # rank 0 is alive: rank 1 is the silent one
            time.sleep(0.2)
        client.close()
        assert exit_code(coordinators) == 1
        assert silent.wait(10) == -signal.SIGKILL
    finally:
        silent.kill()
        silent.wait()
    failure = summary_of(tmp_path)["failure"]
    assert (failure["rank"], failure["cause"]) == (1, "frozen")


def test_a_stopped_rank_is_the_frozen_cause_even_if_its_neighbours_ended_first(
    tmp_path: Path, coordinators: list[Any], stopped_rank: subprocess.Popen[bytes]
) -> None:
    """Rank 0's own link timeout ended it before the silence timeout named rank 1."""
    node = NodeRanks({1: stopped_rank.pid}, launcher_pid=os.getpid())
    address = start(tmp_path, coordinators, world_size=2, silence_timeout_s=600.0, node=node)
    send_from_child(address, [error(0, "peer-lost", 1, "send to rank 1 timed out")])
    assert exit_code(coordinators) == 1
    assert stopped_rank.wait(10) == -signal.SIGKILL
    failure = summary_of(tmp_path)["failure"]
    assert (failure["rank"], failure["cause"]) == (1, "frozen")
    why = "its process is stopped (SIGSTOP?)"
    assert failure["message"] == f"stage 1 (rank 1) stopped responding: {why}"


def test_a_pid_that_is_not_the_launchers_child_is_never_killed(
    tmp_path: Path, coordinators: list[Any], stopped_rank: subprocess.Popen[bytes]
) -> None:
    """The pid of a rank that ended may name another process by now: left alone."""
    node = NodeRanks({1: stopped_rank.pid}, launcher_pid=os.getppid())
    start(tmp_path, coordinators, world_size=2, silence_timeout_s=2.0, node=node)
    assert exit_code(coordinators) == 1
    assert psutil.Process(stopped_rank.pid).status() == psutil.STATUS_STOPPED


def test_the_coordinator_never_preempts_a_ranks_compute(
    tmp_path: Path, coordinators: list[Any]
) -> None:
    # Every thread of it (its own and pyzmq's) under SCHED_BATCH (trgl_dist/scheduling.py).
    start(tmp_path, coordinators, world_size=2)
    pid = coordinators[-1].pid
    threads = os.listdir(f"/proc/{pid}/task")
    assert len(threads) >= 2  # the coordinator's thread and pyzmq's I/O thread
    assert {os.sched_getscheduler(int(tid)) for tid in threads} == {os.SCHED_BATCH}
    coordinators[-1].terminate()
    exit_code(coordinators)
