"""TensorBoard scalars of the records, through tensorboard's own writer (no torch import)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from trgl_dist.metrics.records import EpochRecord, EvalRecord, Record, StageRecord, TrainRecord

logger = logging.getLogger(__name__)

# Identity fields of a record: they say where a value comes from, they are not values.
_NOT_SCALARS = frozenset({"step", "epoch", "module", "stage", "modules", "rank", "peer"})


def scalar_tags(rec: Record) -> Iterator[tuple[str, float]]:
    """(tag, value) pairs of a record; modules are named 1-based for humans."""
    if isinstance(rec, TrainRecord | EvalRecord):
        prefix = f"module{rec.module + 1}/{rec.kind}_"
    elif isinstance(rec, StageRecord):  # an EndRecord too
        prefix = f"stage{rec.stage}/"
    elif isinstance(rec, EpochRecord):
        prefix = "epoch/"
    else:
        return
    for f in dataclasses.fields(rec):
        value = getattr(rec, f.name)
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if is_number and f.name not in _NOT_SCALARS:
            yield prefix + str(f.metadata.get("json", f.name)), float(value)


class TensorBoardScalars:
    """Scalar events in ``log_dir``; a fresh run removes older event files first."""

    def __init__(self, log_dir: Path, *, append: bool) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        if not append:
            # A fresh metrics.jsonl with old event files beside it would mix two runs' curves.
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self._event = event_pb2.Event
        self._summary = summary_pb2.Summary
        self._writer = EventFileWriter(str(log_dir), flush_secs=10)

    def add(self, rec: Record) -> None:
        values = [self._summary.Value(tag=t, simple_value=v) for t, v in scalar_tags(rec)]
        if values:
            summary = self._summary(value=values)
            event = self._event(wall_time=time.time(), step=rec.step, summary=summary)
            self._writer.add_event(event)

    def close(self) -> None:
        self._writer.close()


def open_tensorboard(log_dir: Path, *, append: bool) -> TensorBoardScalars | None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        logger.info("tensorboard is not installed: no TensorBoard events in %s", log_dir)
        return None
    return TensorBoardScalars(log_dir, append=append)
