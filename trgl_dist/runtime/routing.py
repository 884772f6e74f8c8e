"""Which link a batch takes between the replicas of two stages, in and out.

Out: training batch s goes to replica (s - 1) mod R of the next stage, the test pass to its
replica 0, END to every linked replica. In: a replica takes its batches in the schedule's
order, each from the inbox of the upstream replica that trained on it, so a FIFO pipeline
with replicas computes exactly what the one-process reference with accumulation does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from trgl_dist.layout import Layout
from trgl_dist.runtime.buffer import BatchBuffer
from trgl_dist.runtime.streams import DeviceStreams
from trgl_dist.training.items import Batch, Kind
from trgl_dist.training.schedule import Slot


class RoutingError(RuntimeError):
    """A batch arrived where the schedule says another should have: a runtime bug."""


class Fanout:
    """The outbox as the compute thread sees it: each batch handed off (with its CUDA event
    on GPU) to the outbox of the downstream replica that takes it."""

    def __init__(
        self,
        outboxes: Mapping[int, BatchBuffer],
        streams: DeviceStreams,
        layout: Layout,
        next_stage: int,
    ) -> None:
        self.outboxes, self.streams = dict(outboxes), streams
        self.layout, self.next_stage = layout, next_stage

    @property
    def depth(self) -> int:
        return sum(box.depth for box in self.outboxes.values())

    def put(self, batch: Batch) -> float:
        batch = self.streams.handoff(batch)
        if batch.kind == Kind.END or batch.kind == Kind.ERROR:
            return sum(box.put(batch) for box in self.outboxes.values())
        replica = 0
        if batch.kind == Kind.TRAIN:
            replica = self.layout.replica_for(self.next_stage, batch.step)
        return self.outboxes[self.layout.rank_of(self.next_stage, replica)].put(batch)

    def last_word(self, batch: Batch) -> None:
        """An ERROR batch to every downstream replica, ahead of anything still queued."""
        for box in self.outboxes.values():
            box.last_word(batch)

    def stats(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for box in self.outboxes.values():
            for key, value in box.stats().items():
                if isinstance(value, int | float):
                    merged[key] = merged.get(key, 0) + value
        return merged


def merged_inboxes(
    slots: Iterator[Slot],
    inboxes: Mapping[int, BatchBuffer],
    streams: DeviceStreams,
    layout: Layout,
    stage: int,
    replica: int,
) -> Iterator[tuple[Batch, float]]:
    """This replica's input, in the schedule's order: each of its training batches from the
    upstream replica that trained on it, the test pass (replica 0) from upstream replica 0,
    and END once every inbound link has delivered its END."""
    for slot in slots:
        if slot.kind == Kind.TRAIN and layout.replica_for(stage, slot.step) != replica:
            continue
        if slot.kind == Kind.EVAL and replica != 0:
            continue
        if slot.kind == Kind.END:
            yield _ends(inboxes, slot)
            return
        source = 0 if slot.kind == Kind.EVAL else layout.replica_for(stage - 1, slot.step)
        batch, waited = inboxes[layout.rank_of(stage - 1, source)].get()
        if (batch.kind, batch.step) != (slot.kind, slot.step):
            raise RoutingError(
                f"expected {slot.kind.name} step {slot.step}, got {batch.kind.name} step "
                f"{batch.step} from rank {layout.rank_of(stage - 1, source)}"
            )
        yield streams.adopt(batch), waited


def _ends(inboxes: Mapping[int, BatchBuffer], slot: Slot) -> tuple[Batch, float]:
    waited = 0.0
    end = Batch(Kind.END, slot.step, slot.epoch, None, None, None)
    for inbox in inboxes.values():
        batch, seconds = inbox.get()
        waited += seconds
        if batch.kind != Kind.END:
            raise RoutingError(f"expected END, got {batch.kind.name} step {batch.step}")
        end = batch
    return end, waited
