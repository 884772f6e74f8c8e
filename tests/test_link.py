"""Links: ordered delivery through real Gloo ranks, backpressure, and peers that die."""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import kill_self, run_workers
from trgl_dist.runtime.buffer import BatchBuffer, BufferClosed
from trgl_dist.runtime.link import PeerFailure, Receiver, Sender
from trgl_dist.runtime.planes import LinkEnd
from trgl_dist.runtime.streams import DeviceStreams
from trgl_dist.runtime.topology import Topology
from trgl_dist.runtime.wire import WireFormat, wire_bytes
from trgl_dist.training.items import Batch, Kind

WAIT_S = 40.0  # bound on states that must come; a bug fails the test instead of hanging it


def train(step: int) -> Batch:
    ids = torch.arange(3, dtype=torch.int64) + 3 * step
    return Batch(Kind.TRAIN, step, 0, torch.full((3, 2), float(step)), ids % 10, ids)


def end(step: int, message: str = "") -> Batch:
    return Batch(Kind.END, step, 0, None, None, None, message)


WIRE = WireFormat(max_labels=3)


def receiver(topology: Topology, capacity: int) -> tuple[Receiver, BatchBuffer]:
    inbox = BatchBuffer(capacity)
    streams = DeviceStreams(topology.device)
    thread = Receiver(LinkEnd(topology.inbound_link(), WIRE, topology.device, streams), inbox)
    thread.start()
    return thread, inbox


class Outbox(BatchBuffer):
    """An outbox that hands batches off as a stage's compute thread does."""

    def put(self, batch: Batch) -> float:
        return super().put(DeviceStreams(torch.device("cpu")).handoff(batch))


def sender(topology: Topology, capacity: int) -> tuple[Sender, BatchBuffer]:
    outbox = Outbox(capacity)
    streams = DeviceStreams(topology.device)
    thread = Sender(LinkEnd(topology.outbound_link(), WIRE, topology.device, streams), outbox)
    thread.start()
    return thread, outbox


def wait_for(condition: Any) -> bool:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def forward(inbox: BatchBuffer, outbox: BatchBuffer, die_after: int | None = None) -> None:
    """A middle stage: add 1 to the activations and pass everything on, until END."""
    forwarded = 0
    while True:
        batch, _ = inbox.get()
        x = None if batch.x is None else batch.x + 1
        outbox.put(Batch(batch.kind, batch.step, batch.epoch, x, batch.y, batch.ids, batch.message))
        forwarded += 1
        if forwarded == die_after:
            kill_self()
        if batch.kind == Kind.END:
            return


# -- a chain 0 -> 1 -> 2 with a consumer that starts only once rank 0 is blocked -----------


def flag_when_blocked(outbox: BatchBuffer, flag: Path) -> None:
    # On a timeout the flag is set anyway: the test then fails on blocked_puts, not a hang.
    wait_for(lambda: outbox.stats()["waiting_putters"] > 0)
    flag.touch()


def chain_stage(topology: Topology, num_batches: int, capacity: int, flag_dir: str) -> dict:
    """Rank 0 produces, rank 1 forwards, rank 2 waits for rank 0 to block, then consumes."""
    rank_0_blocked = Path(flag_dir) / "rank0-blocked"
    if topology.is_first:
        thread, outbox = sender(topology, capacity)
        # A watcher thread, because the main thread is the one that will block in put.
        threading.Thread(
            target=flag_when_blocked, args=(outbox, rank_0_blocked), daemon=True
        ).start()
        for step in range(num_batches):
            outbox.put(train(step))
        outbox.put(end(num_batches, "bye"))
        thread.join()
        return {"outbox": outbox.stats(), "link": thread.stats(), "error": repr(thread.error)}
    if not topology.is_last:
        rx, inbox = receiver(topology, capacity)
        tx, outbox = sender(topology, capacity)
        forward(inbox, outbox)
        rx.join()
        tx.join()
        return {"link": rx.stats(), "out": tx.stats(), "error": repr(rx.error or tx.error)}
    rx, inbox = receiver(topology, capacity)
    assert wait_for(rank_0_blocked.exists), "rank 0 never blocked"
    received = []
    while True:
        try:
            batch, _ = inbox.get()
        except BufferClosed:  # the receiver closes the inbox after END
            break
        x = None if batch.x is None else batch.x.unique().tolist()
        received.append((batch.kind, batch.step, x, batch.message))
    rx.join()
    return {"received": received, "inbox": inbox.stats(), "link": rx.stats()}


def test_chain_delivers_in_order_with_bounded_buffers(tmp_path: Path) -> None:
    num_batches, capacity = 30, 2  # far more than the chain can hold, so rank 0 must block
    results = run_workers(chain_stage, 3, num_batches, capacity, str(tmp_path), deadline_s=90)
    assert [r.error for r in results] == ["", "", ""], [r.error for r in results]
    assert [r.exitcode for r in results] == [0, 0, 0]
    first, middle, last = (r.value for r in results)
    want = [(Kind.TRAIN, s, [s + 1.0], "") for s in range(num_batches)]  # rank 1 adds 1
    assert last["received"] == [*want, (Kind.END, num_batches, None, "bye")]
    # backpressure: rank 0 waited on its full outbox instead of growing it
    assert first["outbox"]["blocked_puts"] >= 1
    assert first["outbox"]["max_depth"] <= capacity
    assert last["inbox"]["max_depth"] <= capacity
    assert first["outbox"]["puts"] == first["link"]["batches_sent"] == num_batches + 1
    sent_bytes = sum(wire_bytes(train(s), WIRE) for s in range(num_batches))
    sent_bytes += wire_bytes(end(0, "bye"), WIRE)
    assert first["link"]["bytes_sent"] == middle["link"]["bytes_received"] == sent_bytes
    assert middle["out"]["bytes_sent"] == last["link"]["bytes_received"] == sent_bytes
    assert first["error"] == middle["error"] == "None"


# -- failure: rank 1 of 0 -> 1 -> 2 -> 3 dies mid-stream ------------------------------------


def failing_chain_stage(topology: Topology, die_after: int) -> dict:
    """Rank 1 SIGKILLs itself; everyone else reports the PeerFailure it got, and when."""
    try:
        if topology.is_first:
            _, outbox = sender(topology, 2)
            for step in range(100_000):  # unbounded in practice: only the failure stops it
                outbox.put(train(step))
            return {"peer": None}
        rx, inbox = receiver(topology, 2)
        if topology.is_last:
            while True:
                inbox.get()
        tx, outbox = sender(topology, 2)
        try:
            forward(inbox, outbox, die_after if topology.rank == 1 else None)
        except PeerFailure as exc:
            # What a stage does on failure: tell downstream, then stop.
            outbox.put(Batch(Kind.ERROR, -1, -1, None, None, None, str(exc)))
            tx.join()
            raise
        return {"peer": None}
    except PeerFailure as exc:
        return {"peer": exc.peer, "message": str(exc), "noticed_at": time.time()}


def test_dead_peer_makes_every_survivor_raise_peer_failure() -> None:
    start = time.monotonic()
    results = run_workers(failing_chain_stage, 4, 3, deadline_s=60)
    elapsed = time.monotonic() - start
    assert not any(r.timed_out for r in results)
    assert elapsed < 30.0  # the product's bound on a failure, not a speed test
    assert results[1].exitcode == -9
    for survivor in (0, 2, 3):
        assert results[survivor].exitcode == 0 and not results[survivor].error
    upstream, downstream, last = results[0].value, results[2].value, results[3].value
    assert upstream["peer"] == 1 and "stage 1" in upstream["message"]  # its send failed
    assert downstream["peer"] == 1 and "stage 1" in downstream["message"]  # its recv failed
    # the last stage hears of it through the ERROR batch of stage 2, with the first cause
    assert last["peer"] == 2 and "stage 1" in last["message"]


# -- single process --------------------------------------------------------------------------


def test_sender_refuses_a_replay_outbox() -> None:
    with pytest.raises(ValueError, match="fifo"):
        Sender(None, BatchBuffer(2, "replay", 2))  # type: ignore[arg-type]


def test_peer_failure_names_the_peer_and_survives_pickling() -> None:
    failure = pickle.loads(pickle.dumps(PeerFailure(3, "Connection closed by peer")))
    assert isinstance(failure, RuntimeError) and failure.peer == 3
    assert str(failure) == "stage 3 (rank 3) failed: Connection closed by peer"
