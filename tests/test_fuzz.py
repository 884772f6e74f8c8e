"""A live coordinator under fire: 1,200 random and mutated messages during a real pipeline run."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
from typing import Any

import pytest
import zmq

from tests.launcher import torchrun
from tests.records import end, error, evaluation, train
from trgl_dist.metrics.client import signature
from trgl_dist.metrics.records import EvalRecord, read_records, to_dict

pytestmark = pytest.mark.slow
SECRET = bytes(range(100, 132))
SMALL = ["--dataset", "synthetic", "--model", "resnet-small", "--width", "8", "--batch-size", "16",
         "--log-every", "2", "--modules", "3", "--epochs", "2", "--synthetic-train", "1024"]
MESSAGES = 1200


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def mutated(rng: random.Random, rank: int) -> dict[str, Any]:
    """A record rank ``rank`` could send, broken in one random way that no reading of the
    schema could accept."""
    base = to_dict(rng.choice([
        train(rank, 0, 3), evaluation(1, 0, 0.5, stage=rank), end(rank), error(rank, "exception"),
    ]))
    counts = [k for k in ("step", "epoch", "stage", "module", "samples") if k in base]
    how = rng.randrange(7)
    if how == 0:
        base[rng.choice(counts)] = rng.choice(["x", [1], {"a": 1}, True, 2.5])  # wrong type
    elif how == 1:
        base["kind"] = rng.choice(["bogus", "", "TRAIN", 7, None])  # unknown kind
    elif how == 2:
        base[rng.choice(counts)] = rng.choice([10**40, -(10**40), 2**63])  # huge numbers
    elif how == 3:
        base["stage"] = (rank + rng.randint(1, 2)) % 3  # speaks for another stage
    elif how == 4:
        del base["step"]  # a field missing
    elif how == 5:
        base["surprise"] = rng.random()  # a field too many
    else:
        base["v"] = rng.choice([0, 2, "1", None])  # another version
    return base


def frames(rng: random.Random, i: int) -> list[bytes]:
    """Message i: signed but invalid, unsigned, forged rank, or not even three frames."""
    rank = rng.choice([0, 1, 2])
    payload = json.dumps(mutated(rng, rank)).encode()
    frame = str(rank).encode()
    kind = i % 4
    if kind == 0:
        return [frame, signature(SECRET, frame, payload), payload]
    if kind == 1:
        return [frame, signature(b"guessed" * 5, frame, payload), payload]  # missing secret
    if kind == 2:
        forged = str(rng.choice([3, 99, -1])).encode()  # a rank outside the run
        return [forged, signature(SECRET, forged, payload), payload]
    return [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))]


def fire(address: str, started: threading.Event, sent: list[int]) -> None:
    rng = random.Random(7)
    context = zmq.Context()
    try:
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 10 * MESSAGES)
        sock.connect(address)
        started.wait(120)
        for i in range(MESSAGES):
            sock.send_multipart(frames(rng, i))
            sent[0] += 1
        sock.close(linger=10_000)
    finally:
        context.term()


def test_the_coordinator_survives_and_counts_every_bad_message(tmp_path):
    out = tmp_path / "run"
    port = free_port()
    started, sent = threading.Event(), [0]
    shooter = threading.Thread(target=fire, args=(f"tcp://127.0.0.1:{port}", started, sent))
    shooter.start()

    def once_training(launcher, elapsed):
        path = out / "metrics.jsonl"
        if path.exists() and path.stat().st_size > 0:
            started.set()
            return True
        return False

    os.environ["TRGL_RUN_SECRET"] = SECRET.hex()
    try:
        args = [*SMALL, "--coordinator", f"tcp://127.0.0.1:{port}", "--out", str(out)]
        launch = torchrun(3, args, during=once_training)
    finally:
        del os.environ["TRGL_RUN_SECRET"]
        started.set()
        shooter.join(60)
    assert launch.code == 0, launch.output
    assert sent[0] == MESSAGES
    summary = json.loads((out / "summary.json").read_text())
    records = read_records(out / "metrics.jsonl")
    assert summary["failure"] is None
    assert summary["coordinator"]["malformed"] == MESSAGES
    assert summary["coordinator"]["received"] == len(records)
    assert len(summary["stages"]) == 3
    finals = {r.module: r.accuracy for r in records if isinstance(r, EvalRecord) and r.epoch == 1}
    assert [m["test_accuracy"] for m in summary["modules"]] == [finals[k] for k in range(3)]
    assert not [r for r in records if r.kind == "error"]  # nothing forged got in
