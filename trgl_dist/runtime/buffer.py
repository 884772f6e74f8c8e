"""Bounded batch buffers between threads of a stage: fifo and the DGL replay buffer."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

from trgl_dist.training.items import Batch, Kind

POLICIES = ("fifo", "replay")


class BufferClosed(Exception):
    """The buffer was closed and holds nothing more to deliver (or accepts no more puts)."""


@dataclass
class _Entry:
    batch: Batch
    put_index: int  # 0-based position in the sequence of all puts
    uses: int = 0

    @property
    def is_train(self) -> bool:
        return self.batch.kind == Kind.TRAIN


class BatchBuffer:
    """A bounded buffer of batches; every wait is on a condition variable, never a poll.

    ``fifo``: each batch delivered exactly once, in order; ``put`` blocks while
    ``capacity`` batches are held (backpressure).
    ``replay`` (DGL's asynchronous buffer): ``get`` returns the least-used TRAIN batch,
    the freshest among equals, at most ``max_reuse`` times; a full ``put`` evicts the
    oldest already-used TRAIN batch and blocks only when none has been used. ``get``
    never blocks while a batch is held. EVAL/END/ERROR batches are delivered exactly
    once, in order, and act as a boundary: once one is at the head, the used TRAIN
    batches before it are dropped (unused ones are delivered first). A replayed batch is
    the same object each time: consumers must not modify it in place.
    """

    def __init__(self, capacity: int, policy: str = "fifo", max_reuse: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        if policy not in POLICIES:
            raise ValueError(f"buffer policy must be one of {POLICIES}, got {policy!r}")
        if max_reuse < 1:
            raise ValueError(f"max_reuse must be >= 1, got {max_reuse}")
        self.capacity = capacity
        self.policy = policy
        self.max_reuse = max_reuse if policy == "replay" else 1
        self._entries: list[_Entry] = []  # in put order
        self._changed = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._puts = self._gets = self._max_depth = 0
        self._evictions = self._boundary_drops = self._blocked_puts = 0
        self._waiting_putters = self._waiting_getters = 0
        self._bytes_held = self._max_bytes_held = 0
        self._reuse_histogram: Counter[int] = Counter()  # uses of each retired TRAIN batch
        self._staleness_sum = self._staleness_max = self._train_uses = 0
        self._put_wait_s = self._get_wait_s = 0.0

    @property
    def depth(self) -> int:
        """Number of batches held right now."""
        with self._changed:
            return len(self._entries)

    def put(self, batch: Batch) -> float:
        """Add ``batch``, blocking while the buffer is full; returns the seconds waited."""
        start = time.perf_counter()
        with self._changed:
            self._raise_if_stopped_for_put()
            has_room = self._make_room()
            if not has_room:
                self._blocked_puts += 1
            while not has_room:
                self._waiting_putters += 1
                try:
                    self._changed.wait()
                finally:
                    self._waiting_putters -= 1
                self._raise_if_stopped_for_put()
                has_room = self._make_room()
            self._entries.append(_Entry(batch, self._puts))
            self._puts += 1
            self._account(batch, +1)
            self._max_depth = max(self._max_depth, len(self._entries))
            waited = time.perf_counter() - start
            self._put_wait_s += waited
            self._changed.notify_all()
        return waited

    def get(self) -> tuple[Batch, float]:
        """Next batch by the policy, blocking while empty; returns (batch, seconds waited)."""
        start = time.perf_counter()
        with self._changed:
            entry = self._take()
            while entry is None:
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise BufferClosed("buffer closed and drained")
                self._waiting_getters += 1
                try:
                    self._changed.wait()
                finally:
                    self._waiting_getters -= 1
                entry = self._take()
            self._gets += 1
            waited = time.perf_counter() - start
            self._get_wait_s += waited
            self._changed.notify_all()
        return entry.batch, waited

    def close(self) -> None:
        """No more puts: ``get`` delivers what is left (used TRAIN batches are not replayed)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def last_word(self, batch: Batch) -> None:
        """A failed stage's ERROR batch: whatever is queued is dropped, ``batch`` is the next
        and last one delivered, and later puts are refused. Never blocks (the buffer may be
        full behind a stalled peer)."""
        with self._changed:
            for entry in self._entries:
                self._account(entry.batch, -1)
            self._entries = [_Entry(batch, self._puts)]
            self._puts += 1
            self._account(batch, +1)
            self._closed = True
            self._changed.notify_all()

    def fail(self, exc: BaseException) -> None:
        """Wake every waiter; from now on ``get`` and ``put`` raise ``exc``."""
        with self._changed:
            if self._error is None:  # the first failure is the cause; later ones are echoes
                self._error = exc
            self._changed.notify_all()

    def stats(self) -> dict[str, float | int | dict[int, int]]:
        """Counters for the stage's metrics (a consistent snapshot)."""
        with self._changed:
            uses = max(self._train_uses, 1)
            return {
                "depth": len(self._entries),
                "puts": self._puts,
                "gets": self._gets,
                "max_depth": self._max_depth,
                "reuse_histogram": dict(sorted(self._reuse_histogram.items())),
                "mean_staleness": self._staleness_sum / uses,
                "max_staleness": self._staleness_max,
                "evictions": self._evictions,
                "boundary_drops": self._boundary_drops,
                "bytes_held": self._bytes_held,
                "max_bytes_held": self._max_bytes_held,
                "blocked_puts": self._blocked_puts,  # puts that had to wait: backpressure
                "waiting_putters": self._waiting_putters,
                "waiting_getters": self._waiting_getters,
                "put_wait_s": self._put_wait_s,
                "get_wait_s": self._get_wait_s,
            }

    # -- internals: all called with the condition's lock held --------------------------

    def _raise_if_stopped_for_put(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise BufferClosed("put on a closed buffer")

    def _make_room(self) -> bool:
        """True when one more batch fits, evicting an already-used batch under replay."""
        if len(self._entries) < self.capacity:
            return True
        if self.policy != "replay":
            return False
        used = [e for e in self._entries if e.is_train and e.uses > 0]
        if not used:
            return False
        self._retire(used[0])  # the oldest: entries are in put order
        self._evictions += 1
        return True

    def _take(self) -> _Entry | None:
        """Remove or reuse the next entry by the policy; None when nothing is deliverable."""
        if self._error is not None or not self._entries:
            return None
        if self.policy == "fifo":
            return self._deliver_once(self._entries[0])
        boundary = next((i for i, e in enumerate(self._entries) if not e.is_train), None)
        train = self._entries[: len(self._entries) if boundary is None else boundary]
        if boundary is not None or self._closed:
            # Past a boundary (or after close) used batches must not be replayed again.
            train = [e for e in train if e.uses == 0]
        if train:
            return self._use(min(train, key=lambda e: (e.uses, -e.put_index)))
        if boundary is None:
            self._drop_used(len(self._entries))
            return None
        self._drop_used(boundary)
        return self._deliver_once(self._entries[0])

    def _use(self, entry: _Entry) -> _Entry:
        entry.uses += 1
        staleness = self._puts - entry.put_index - 1
        self._train_uses += 1
        self._staleness_sum += staleness
        self._staleness_max = max(self._staleness_max, staleness)
        if entry.uses >= self.max_reuse:
            self._retire(entry)
        return entry

    def _deliver_once(self, entry: _Entry) -> _Entry:
        if entry.is_train:
            return self._use(entry)
        self._entries.remove(entry)
        self._account(entry.batch, -1)
        return entry

    def _drop_used(self, end: int) -> None:
        """Drop the used TRAIN entries among the first ``end`` (all of them are used)."""
        for entry in self._entries[:end]:
            self._retire(entry)
            self._boundary_drops += 1

    def _retire(self, entry: _Entry) -> None:
        self._entries.remove(entry)
        self._account(entry.batch, -1)
        self._reuse_histogram[entry.uses] += 1

    def _account(self, batch: Batch, sign: int) -> None:
        self._bytes_held += sign * batch.nbytes()
        self._max_bytes_held = max(self._max_bytes_held, self._bytes_held)
