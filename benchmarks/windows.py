"""A pipeline stage's **steady window**: between two of its own cumulative records in
`metrics.jsonl`, the first periodic `stage` record (about 2 s in, after start-up and the
pipeline's fill) and the last periodic one written before the stage had trained its last
batch (fewer samples than its `end` record). A run's test pass and checkpoint come after
its last training batch, so neither is in the window. A run too short to hold two such
records falls back to the stage's whole life (start-up, fill, test pass and checkpoint
included), and says so. Each record carries the stage's cumulative samples and their rate
since the stage started, so its age is their quotient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trgl_dist.metrics.records import EndRecord, Record, StageRecord

STEADY = "steady (first periodic record to last one before training ended)"
WHOLE = "whole stage life (too short for a steady window)"


def _elapsed(record: StageRecord | None) -> float:
    """A stage record's seconds since the stage started (it carries samples and their rate)."""
    if record is None:
        return 0.0
    rate = record.samples_per_s
    return record.samples / rate if rate > 0 else 0.0


def _get(record: StageRecord | None, name: str) -> float:
    return 0.0 if record is None else float(getattr(record, name))


@dataclass(frozen=True)
class Window:
    """Two cumulative records of one stage (``first`` None: the stage's start)."""

    first: StageRecord | None
    last: StageRecord
    how: str

    def delta(self, name: str) -> float:
        return _get(self.last, name) - _get(self.first, name)

    @property
    def seconds(self) -> float:
        return _elapsed(self.last) - _elapsed(self.first)

    @property
    def samples(self) -> float:
        return self.delta("samples")

    def describe(self, batch: int) -> dict[str, Any]:
        return {
            "measured": self.how,
            "first_step": self.first.step if self.first is not None else 0,
            "last_step": self.last.step,
            "steps": self.samples / batch,
            "seconds": self.seconds,
        }


def stage_window(records: list[Record], stage: int, replica: int = 0) -> Window:
    """One replica's steady window (see the module docstring)."""
    mine = [
        r for r in records
        if isinstance(r, StageRecord) and r.stage == stage and r.replica == replica
    ]  # fmt: skip
    ends = [r for r in mine if isinstance(r, EndRecord)]
    if not ends:
        raise RuntimeError(
            f"stage {stage} replica {replica} has no readable end record in its metrics.jsonl"
        )
    end = ends[-1]
    periodic = [r for r in mine if type(r) is StageRecord and 0 < r.samples < end.samples]
    if len(periodic) >= 2 and periodic[-1].samples > periodic[0].samples:
        return Window(periodic[0], periodic[-1], STEADY)
    return Window(None, end, WHOLE)
