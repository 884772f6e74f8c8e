"""A run's timeline: every rank's span file (spans.py) merged into one Chrome trace that
ui.perfetto.dev and chrome://tracing load, each rank's clock corrected by an offset the
coordinator estimated from its messages. No torch here: the coordinator stays light."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from trgl_dist.atomic import atomic_write
from trgl_dist.errors import StorageError
from trgl_dist.metrics.spans import RankSpans, read_span_file
from trgl_dist.rundir import TRACE_DIR, TRACE_FILE

logger = logging.getLogger(__name__)

# Lanes top to bottom in the order data flows through a rank; other lanes follow.
_LANE_ORDER = ("receive", "compute", "send")

# Metadata events Perfetto reads, and the argument each must carry.
_METADATA_ARG = {
    "process_name": "name",
    "thread_name": "name",
    "process_sort_index": "sort_index",
    "thread_sort_index": "sort_index",
}


class ClockOffsets:
    """Each rank's clock offset from the coordinator's, from timestamped messages.

    A message sent at s (rank clock) and received at r (coordinator clock) has
    r - s = offset + delay with delay >= 0: every observation bounds the offset from above
    and the one with least delay bounds it best. The estimate stays high by that least
    one-way delay (tens of microseconds on one host).
    """

    def __init__(self) -> None:
        self._least: dict[int, int] = {}

    def observe(self, rank: int, sent_at_ns: int, received_at_ns: int) -> None:
        gap = received_at_ns - sent_at_ns
        self._least[rank] = min(gap, self._least.get(rank, gap))

    def offset_ns(self, rank: int) -> int:
        """Add this to the rank's timestamps to get the coordinator's clock; 0 if never heard."""
        return self._least.get(rank, 0)

    def as_dict(self) -> dict[int, int]:
        return dict(self._least)


@dataclass(frozen=True)
class MergeSummary:
    """What merge wrote: the file, its span count, the ranks, and the time they cover."""

    path: Path
    spans: int
    ranks: tuple[int, ...]
    duration_s: float
    dropped: tuple[int, ...]  # ranks that hit their span limit: their trace ends early


def _lane_key(lane: str) -> tuple[int, str]:
    order = next((i for i, p in enumerate(_LANE_ORDER) if lane.startswith(p)), len(_LANE_ORDER))
    return order, lane


def _metadata(kind: str, pid: int, tid: int | None, **args: object) -> dict[str, Any]:
    event = {"ph": "M", "name": kind, "pid": pid, "args": args}
    return event if tid is None else event | {"tid": tid}


def _rank_events(read: RankSpans, shift_ns: int) -> Iterator[dict[str, Any]]:
    """Chrome events of one rank: its track names, then its spans with ts and dur in us."""
    pid = read.rank + 1  # Perfetto treats pid 0 as the kernel's idle process
    yield _metadata("process_name", pid, None, name=read.label)
    yield _metadata("process_sort_index", pid, None, sort_index=read.rank)
    lanes = sorted({s["lane"] for s in read.spans}, key=_lane_key)
    tids = {lane: tid for tid, lane in enumerate(lanes, start=1)}
    for lane, tid in tids.items():
        yield _metadata("thread_name", pid, tid, name=lane)
        yield _metadata("thread_sort_index", pid, tid, sort_index=tid)
    # parents before children: Perfetto nests the spans of one track in this order
    for s in sorted(read.spans, key=lambda s: (s["start_ns"], -s["dur_ns"])):
        ts, dur = (s["start_ns"] + shift_ns) / 1000, s["dur_ns"] / 1000
        where = {"ph": "X", "ts": ts, "dur": dur, "pid": pid, "tid": tids[s["lane"]]}
        yield {"name": s["name"], "cat": s.get("cat", "other"), "args": s.get("args", {})} | where


def _extent(read: RankSpans, shift_ns: int) -> tuple[int, int] | None:
    """First start and last end of a rank's spans on the coordinator's clock."""
    if not read.spans:
        return None
    first = min(s["start_ns"] for s in read.spans)
    last = max(s["start_ns"] + s["dur_ns"] for s in read.spans)
    return first + shift_ns, last + shift_ns


def merge(span_files: Sequence[Path], offsets: Mapping[int, int], out_path: Path) -> MergeSummary:
    """Merge the ranks' span files into one Chrome trace at ``out_path``, written whole or not
    at all (a StorageError if it cannot be). Each rank's times are shifted by its offset
    (ns, missing = 0) and counted from the earliest span. Files are read twice, one at a
    time, so memory holds one rank's spans, never the whole run's."""
    found, spans, extents = [], 0, []
    for path in span_files:
        read = read_span_file(path)
        if read is not None:
            found.append((Path(path), read.rank, read.dropped_after))
            spans += len(read.spans)
            extents.append(_extent(read, offsets.get(read.rank, 0)))
    t0 = min((e[0] for e in extents if e), default=0)
    t1 = max((e[1] for e in extents if e), default=t0)
    ranks = tuple(rank for _, rank, _ in found)
    dropped = {rank: after for _, rank, after in found if after is not None}
    other = {
        "start_unix_ns": t0,
        "clock_offsets_ns": {str(rank): offsets.get(rank, 0) for rank in ranks},
        "spans_dropped_after": {str(rank): after for rank, after in dropped.items()},
    }

    def write(out: BinaryIO) -> None:
        out.write(b'{"traceEvents": [')
        separator = b"\n"
        for read in filter(None, (read_span_file(path) for path, _, _ in found)):
            for event in _rank_events(read, offsets.get(read.rank, 0) - t0):
                out.write(separator + json.dumps(event).encode())
                separator = b",\n"
        out.write(f'\n], "displayTimeUnit": "ms", "otherData": {json.dumps(other)}}}\n'.encode())

    atomic_write(Path(out_path), write)
    return MergeSummary(Path(out_path), spans, ranks, (t1 - t0) / 1e9, tuple(dropped))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _span_problems(event: Mapping[str, Any]) -> list[str]:
    problems = [] if isinstance(event.get("name"), str) else ["name is not a string"]
    for key in ("ts", "dur"):
        if not _is_number(event.get(key)) or event[key] < 0:
            problems.append(f"{key} is not a number >= 0")
    for key in ("pid", "tid"):
        if not isinstance(event.get(key), int) or isinstance(event[key], bool):
            problems.append(f"{key} is not an integer")
    return problems


def _metadata_problems(event: Mapping[str, Any]) -> list[str]:
    kind = event.get("name")
    arg = _METADATA_ARG.get(kind) if isinstance(kind, str) else None
    if kind is None or arg is None:
        return [f"metadata name {kind!r} is not one of {sorted(_METADATA_ARG)}"]
    problems = [] if isinstance(event.get("pid"), int) else ["pid is not an integer"]
    if kind.startswith("thread") and not isinstance(event.get("tid"), int):
        problems.append("tid is not an integer")
    args = event.get("args")
    value = args.get(arg) if isinstance(args, dict) else None
    wanted = str if arg == "name" else int
    if not isinstance(value, wanted) or isinstance(value, bool):
        problems.append(f"args.{arg} is not a {wanted.__name__}")
    return problems


def validate(trace: object) -> list[str]:
    """What keeps Perfetto or chrome://tracing from reading ``trace`` as meant, one line a
    problem (empty when none), for the event kinds merge writes: X spans and M metadata."""
    events = trace.get("traceEvents") if isinstance(trace, dict) else None
    if not isinstance(events, list):
        return ["traceEvents is not a list"]
    problems = []
    for i, event in enumerate(events):
        ph = event.get("ph") if isinstance(event, dict) else None
        if ph == "X":
            found = _span_problems(event)
        elif ph == "M":
            found = _metadata_problems(event)
        else:
            found = [
                f"ph is {ph!r}, not 'X' or 'M'" if isinstance(event, dict) else "not an object"
            ]
        problems += [f"event {i}: {problem}" for problem in found]
    return problems


def merge_trace(run_dir: Path, clocks: ClockOffsets) -> MergeSummary | None:
    """RUN_DIR/trace.json from the ranks' span files in RUN_DIR/trace/, if the run traced;
    a disk that cannot take it costs the trace, never the run's outcome."""
    files = sorted((Path(run_dir) / TRACE_DIR).glob("rank-*.jsonl"))
    if not files:
        return None
    try:
        summary = merge(files, clocks.as_dict(), Path(run_dir) / TRACE_FILE)
    except (StorageError, OSError) as err:
        logger.warning("trace not written: %s", err)
        return None
    logger.info("trace of %d ranks, %d spans, written to %s", len(summary.ranks),
                summary.spans, summary.path)
    return summary
