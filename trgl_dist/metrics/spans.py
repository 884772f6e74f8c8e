"""A rank's timeline spans: recorded while it trains, one JSON object a line in its own
file, so a rank killed mid-write leaves every complete line readable (trace.py merges the
files of a run). No torch here: the coordinator reads these files.

    {"rank": 3, "label": "stage 1 replica 1 (rank 3)"}            first line
    {"name": "forward m3", "cat": "forward", "lane": "compute",
     "start_ns": 1718000000123456789, "dur_ns": 41250, "args": {}}  one a span (wall clock)
    {"dropped_after": 200000}                                      once, if the limit was hit
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

DEFAULT_MAX_SPANS = 200_000

#: (span name prefix, family: the event's "cat", colour in the timeline picture)
FAMILIES = (
    ("train batch", "train", "#d9d9d9"),
    ("forward", "forward", "#4c78a8"),
    ("backward", "backward", "#f58518"),
    ("step", "step", "#54a24b"),
    ("wait for input", "wait_in", "#e45756"),
    ("blocked on outbox", "wait_out", "#b279a2"),
    ("send", "send", "#72b7b2"),
    ("receive", "receive", "#9d755d"),
    ("eval", "eval", "#eeca3b"),
    ("checkpoint", "checkpoint", "#555555"),
    ("all-reduce", "allreduce", "#ff9da6"),
)
OTHER = ("other", "other", "#bbbbbb")

_NO_SPAN = contextlib.nullcontext()


@functools.lru_cache(maxsize=1024)  # a rank repeats a few names: "forward m3" every batch
def family(name: str) -> str:
    """The family of a span name ("forward m3" -> "forward"): colours and filters use it."""
    return next(
        (cat for prefix, cat, _ in FAMILIES if (name + " ").startswith(prefix + " ")), "other"
    )


def _line(obj: Mapping[str, Any]) -> str:
    # default=str: an argument that is not JSON (a Path, a dtype) must not fail training
    return json.dumps(obj, separators=(",", ":"), default=str) + "\n"


class NullRecorder:
    """The recorder when tracing is off: the pipeline calls it every batch, so it does nothing."""

    def span(self, name: str, lane: str, **args: object) -> contextlib.AbstractContextManager[None]:
        return _NO_SPAN

    def add(self, name: str, lane: str, start_ns: int, end_ns: int, **args: object) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class SpanRecorder:
    """Records one rank's spans to its span file; thread-safe, bounded, never fails training.

    Lines are buffered and written every ``flush_every`` spans or ``flush_s`` seconds (checked
    when a span ends) and at close(). Past ``max_spans`` it stops and notes it once in the
    file. A write that fails (full disk) stops tracing with one warning.
    """

    def __init__(
        self,
        path: Path,
        *,
        rank: int,
        label: str,
        max_spans: int = DEFAULT_MAX_SPANS,
        flush_every: int = 1000,
        flush_s: float = 2.0,
    ) -> None:
        self.path = Path(path)
        self.max_spans = max_spans
        self.recording = True
        self._flush_every = flush_every
        self._flush_s = flush_s
        self._lock = threading.Lock()
        self._lines = [_line({"rank": rank, "label": label})]
        self._kept = 0
        self._last_flush = time.monotonic()
        self._file: IO[str] | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as err:
            self._fail(err)
        self._flush()  # the header at once: a rank killed early still names itself

    def span(self, name: str, lane: str, **args: object) -> contextlib.AbstractContextManager[None]:
        """Time the body of a with-block as one span on ``lane`` (recorded even if it raises)."""
        return self._timed(name, lane, args) if self.recording else _NO_SPAN

    def add(self, name: str, lane: str, start_ns: int, end_ns: int, **args: object) -> None:
        """Record a span timed elsewhere, from two ``time.time_ns()`` readings."""
        if self.recording:
            self._record(name, lane, start_ns, end_ns, args)

    def flush(self) -> None:
        """Write what is buffered now (a rank does before its end record: the coordinator
        merges the files once every rank has ended)."""
        with self._lock:
            self._flush()

    def close(self) -> None:
        """Write what is buffered and close the file; later spans are ignored."""
        with self._lock:
            self._flush()
            self.recording = False
            if self._file is not None:
                with contextlib.suppress(OSError):  # a failed write was already reported
                    self._file.close()
                self._file = None

    @contextlib.contextmanager
    def _timed(self, name: str, lane: str, args: dict[str, object]) -> Iterator[None]:
        start_ns = time.time_ns()
        try:
            yield
        finally:
            self._record(name, lane, start_ns, time.time_ns(), args)

    def _record(
        self, name: str, lane: str, start_ns: int, end_ns: int, args: dict[str, object]
    ) -> None:
        span = {"name": name, "cat": family(name), "lane": lane}
        line = _line(
            span | {"start_ns": start_ns, "dur_ns": max(end_ns - start_ns, 0), "args": args}
        )
        with self._lock:
            if not self.recording:
                return
            if self._kept >= self.max_spans:
                self.recording = False
                self._lines.append(_line({"dropped_after": self._kept}))
                self._flush()
                return
            self._lines.append(line)
            self._kept += 1
            if len(self._lines) >= self._flush_every or self._flush_due():
                self._flush()

    def _flush_due(self) -> bool:
        return time.monotonic() - self._last_flush >= self._flush_s

    def _flush(self) -> None:
        """Write the buffered lines (with the lock held, or before any thread has the recorder)."""
        if self._file is not None and self._lines:
            try:
                self._file.write("".join(self._lines))
                self._file.flush()
            except OSError as err:
                self._fail(err)
        self._lines.clear()
        self._last_flush = time.monotonic()

    def _fail(self, err: OSError) -> None:
        logger.warning("tracing stopped: cannot write %s: %s", self.path, err.strerror or err)
        self.recording = False
        self._lines.clear()
        if self._file is not None:
            with contextlib.suppress(OSError):  # closing flushes the same buffer again
                self._file.close()
            self._file = None


#: What a rank records: a SpanRecorder, or a NullRecorder when tracing is off.
Recorder = SpanRecorder | NullRecorder


@dataclass(frozen=True)
class RankSpans:
    """One rank's span file, read back."""

    rank: int
    label: str
    spans: list[dict[str, Any]]
    dropped_after: int | None


def _parse(line: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except ValueError:  # the last line of a rank killed mid-write
        return None
    return obj if isinstance(obj, dict) else None


def read_span_file(path: Path) -> RankSpans | None:
    """A rank's spans; None when the file is missing or lacks its first line."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        logger.warning("trace: skipping %s: %s", path, err.strerror or err)
        return None
    objects = [obj for obj in map(_parse, text.splitlines()) if obj is not None]
    if not objects or not isinstance(objects[0].get("rank"), int):
        return None
    head, rest = objects[0], objects[1:]
    spans = [
        o for o in rest if isinstance(o.get("start_ns"), int) and isinstance(o.get("dur_ns"), int)
    ]
    dropped = next((o["dropped_after"] for o in rest if "dropped_after" in o), None)
    return RankSpans(head["rank"], str(head.get("label", f"rank {head['rank']}")), spans, dropped)
