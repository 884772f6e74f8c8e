"""BatchBuffer: fifo and replay policies, backpressure, close and fail, with real threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from trgl_dist.runtime.buffer import BatchBuffer, BufferClosed
from trgl_dist.training.items import Batch, Kind

WAIT_S = 20.0  # generous bound for a state that must come; never an assertion on speed


def train(step: int) -> Batch:
    return Batch(Kind.TRAIN, step, 0, torch.full((2, 3), float(step)), None, None)


def control(kind: Kind, step: int) -> Batch:
    return Batch(kind, step, 0, None, None, None)


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a state that another thread must reach (bounded, so a bug fails, not hangs)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "state never reached"
        time.sleep(0.005)


def start(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def steps_of(buffer: BatchBuffer, count: int) -> list[tuple[Kind, int]]:
    return [(b.kind, b.step) for b, _ in (buffer.get() for _ in range(count))]


def test_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="capacity"):
        BatchBuffer(0)
    with pytest.raises(ValueError, match="policy"):
        BatchBuffer(2, "lifo")
    with pytest.raises(ValueError, match="max_reuse"):
        BatchBuffer(2, "replay", max_reuse=0)


def test_fifo_delivers_each_batch_once_in_order() -> None:
    buffer = BatchBuffer(3)
    for step in range(3):
        buffer.put(train(step))
    assert steps_of(buffer, 2) == [(Kind.TRAIN, 0), (Kind.TRAIN, 1)]
    buffer.put(control(Kind.EVAL, 3))
    buffer.put(train(4))
    assert steps_of(buffer, 3) == [(Kind.TRAIN, 2), (Kind.EVAL, 3), (Kind.TRAIN, 4)]
    stats = buffer.stats()
    assert (stats["puts"], stats["gets"], stats["depth"], stats["max_depth"]) == (5, 5, 0, 3)
    assert stats["reuse_histogram"] == {1: 4}  # the four TRAIN batches, each used once
    # staleness = batches put after it, at its use: 2, 1, then 2 for step 2 (3, 4 came), 0
    assert stats["max_staleness"] == 2
    assert stats["mean_staleness"] == pytest.approx((2 + 1 + 2 + 0) / 4)


def test_put_blocks_while_full_until_a_get() -> None:
    buffer = BatchBuffer(2)
    buffer.put(train(0))
    buffer.put(train(1))
    put_done = threading.Event()
    producer = start(lambda: (buffer.put(train(2)), put_done.set()))
    wait_until(lambda: buffer.stats()["waiting_putters"] == 1)
    assert not put_done.is_set() and buffer.depth == 2
    assert buffer.get()[0].step == 0
    assert put_done.wait(WAIT_S)
    producer.join(WAIT_S)
    assert buffer.depth == 2 and buffer.stats()["blocked_puts"] == 1
    assert buffer.stats()["max_depth"] == 2


def test_get_blocks_while_empty_until_a_put() -> None:
    buffer = BatchBuffer(2)
    received: list[int] = []
    consumer = start(lambda: received.append(buffer.get()[0].step))
    wait_until(lambda: buffer.stats()["waiting_getters"] == 1)
    assert received == []
    buffer.put(train(7))
    consumer.join(WAIT_S)
    assert received == [7]


def test_close_drains_then_raises() -> None:
    buffer = BatchBuffer(4)
    buffer.put(train(0))
    buffer.put(control(Kind.END, 1))
    buffer.close()
    with pytest.raises(BufferClosed):
        buffer.put(train(2))
    assert steps_of(buffer, 2) == [(Kind.TRAIN, 0), (Kind.END, 1)]
    with pytest.raises(BufferClosed):
        buffer.get()


def test_close_wakes_a_blocked_getter() -> None:
    buffer = BatchBuffer(2)
    outcome: list[BaseException] = []

    def consume() -> None:
        try:
            buffer.get()
        except BufferClosed as exc:
            outcome.append(exc)

    consumer = start(consume)
    wait_until(lambda: buffer.stats()["waiting_getters"] == 1)
    buffer.close()
    consumer.join(WAIT_S)
    assert len(outcome) == 1 and isinstance(outcome[0], BufferClosed)


def test_fail_wakes_blocked_putter_and_getter_and_reraises() -> None:
    full, empty = BatchBuffer(1), BatchBuffer(1)
    full.put(train(0))
    raised: list[BaseException] = []

    def record(action: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                action()
            except RuntimeError as exc:
                raised.append(exc)

        return run

    threads = [start(record(lambda: full.put(train(1)))), start(record(empty.get))]
    wait_until(lambda: full.stats()["waiting_putters"] == 1)
    wait_until(lambda: empty.stats()["waiting_getters"] == 1)
    cause = RuntimeError("stage 3 died")
    full.fail(cause)
    empty.fail(cause)
    full.fail(RuntimeError("an echo, not the cause"))
    for thread in threads:
        thread.join(WAIT_S)
    assert raised == [cause, cause]
    with pytest.raises(RuntimeError, match="stage 3 died"):
        full.get()  # even with a batch held: the failure wins
    with pytest.raises(RuntimeError, match="stage 3 died"):
        empty.put(train(2))


def test_replay_picks_least_used_then_freshest_and_respects_max_reuse() -> None:
    buffer = BatchBuffer(3, "replay", max_reuse=2)
    for step in range(3):
        buffer.put(train(step))
    # unused first, freshest first; then the once-used, freshest first
    assert [b.step for b, _ in (buffer.get() for _ in range(6))] == [2, 1, 0, 2, 1, 0]
    assert buffer.depth == 0  # each used max_reuse times, then dropped
    stats = buffer.stats()
    assert stats["reuse_histogram"] == {2: 3}
    assert stats["max_staleness"] == 2 and stats["mean_staleness"] == pytest.approx(1.0)


def test_replay_get_never_blocks_while_a_batch_is_held() -> None:
    buffer = BatchBuffer(2, "replay", max_reuse=3)
    buffer.put(train(5))
    assert [buffer.get()[0].step for _ in range(3)] == [5, 5, 5]
    assert buffer.depth == 0


def test_replay_put_evicts_oldest_used_batch() -> None:
    buffer = BatchBuffer(3, "replay", max_reuse=5)
    for step in range(3):
        buffer.put(train(step))
    assert buffer.get()[0].step == 2
    assert buffer.get()[0].step == 1
    buffer.put(train(3))  # full: evicts step 1, the oldest used (step 0 is unused)
    assert buffer.stats()["evictions"] == 1 and buffer.depth == 3
    assert [buffer.get()[0].step for _ in range(2)] == [3, 0]
    # all used once now: least used, then freshest by put order
    assert [buffer.get()[0].step for _ in range(3)] == [3, 2, 0]
    assert buffer.stats()["reuse_histogram"] == {1: 1}  # the evicted step 1
    # staleness of step 0's first use: steps 1, 2, 3 were put after it
    assert buffer.stats()["max_staleness"] == 3


def test_replay_put_blocks_when_nothing_was_used() -> None:
    buffer = BatchBuffer(2, "replay", max_reuse=3)
    buffer.put(train(0))
    buffer.put(train(1))
    put_done = threading.Event()
    producer = start(lambda: (buffer.put(train(2)), put_done.set()))
    wait_until(lambda: buffer.stats()["waiting_putters"] == 1)
    assert not put_done.is_set()
    assert buffer.get()[0].step == 1  # a use (not a removal) makes step 1 evictable
    assert put_done.wait(WAIT_S)
    producer.join(WAIT_S)
    assert buffer.stats()["evictions"] == 1
    assert [buffer.get()[0].step for _ in range(2)] == [2, 0]


def test_replay_never_replays_or_evicts_control_batches() -> None:
    buffer = BatchBuffer(4, "replay", max_reuse=3)
    buffer.put(train(0))
    buffer.put(train(1))
    buffer.put(control(Kind.EVAL, 2))
    buffer.put(train(3))
    # unused TRAIN before the boundary first, then the used ones are dropped, EVAL once
    assert steps_of(buffer, 3) == [(Kind.TRAIN, 1), (Kind.TRAIN, 0), (Kind.EVAL, 2)]
    assert buffer.stats()["boundary_drops"] == 2
    assert steps_of(buffer, 2) == [(Kind.TRAIN, 3), (Kind.TRAIN, 3)]
    buffer.put(control(Kind.END, 4))
    buffer.close()
    assert steps_of(buffer, 1) == [(Kind.END, 4)]
    with pytest.raises(BufferClosed):
        buffer.get()
    assert buffer.stats()["reuse_histogram"] == {1: 2, 2: 1}


def test_replay_full_of_control_batches_blocks_put() -> None:
    buffer = BatchBuffer(1, "replay", max_reuse=2)
    buffer.put(control(Kind.EVAL, 0))
    put_done = threading.Event()
    producer = start(lambda: (buffer.put(train(1)), put_done.set()))
    wait_until(lambda: buffer.stats()["waiting_putters"] == 1)
    assert not put_done.is_set() and buffer.stats()["evictions"] == 0
    assert buffer.get()[0].kind == Kind.EVAL
    assert put_done.wait(WAIT_S)
    producer.join(WAIT_S)


def test_replay_after_close_drains_unused_and_stops_replaying() -> None:
    buffer = BatchBuffer(3, "replay", max_reuse=4)
    buffer.put(train(0))
    buffer.put(train(1))
    assert buffer.get()[0].step == 1
    buffer.close()
    assert buffer.get()[0].step == 0
    with pytest.raises(BufferClosed):
        buffer.get()
    assert buffer.stats()["boundary_drops"] == 2


def test_bytes_held_are_accounted() -> None:
    buffer = BatchBuffer(3)
    batch = train(0)  # float32 (2, 3): 24 bytes of activations, no labels
    assert batch.nbytes() == 24
    buffer.put(batch)
    buffer.put(train(1))
    assert buffer.stats()["bytes_held"] == 2 * batch.nbytes()
    buffer.get()
    buffer.get()
    stats = buffer.stats()
    assert stats["bytes_held"] == 0 and stats["max_bytes_held"] == 2 * batch.nbytes()


def test_many_threads_exactly_once() -> None:
    buffer = BatchBuffer(2)
    received: list[int] = []
    lock = threading.Lock()

    def consume() -> None:
        while True:
            try:
                step = buffer.get()[0].step
            except BufferClosed:
                return
            with lock:
                received.append(step)

    consumers = [start(consume) for _ in range(3)]
    for step in range(300):
        buffer.put(train(step))
    buffer.close()
    for consumer in consumers:
        consumer.join(WAIT_S)
    assert sorted(received) == list(range(300))
    assert buffer.stats()["max_depth"] <= 2
