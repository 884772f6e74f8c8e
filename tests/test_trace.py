"""Tests of the run's timeline: span files per rank, their merge into a Chrome trace, a picture."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from trgl_dist.metrics import spans
from trgl_dist.metrics.spans import NullRecorder, SpanRecorder, family, read_span_file
from trgl_dist.metrics.timeline import default_window, plot_timeline
from trgl_dist.metrics.trace import ClockOffsets, merge, validate

BASE_NS = 1_700_000_000_000_000_000  # a wall-clock time in ns, like time.time_ns()
MS = 1_000_000


def _span_file(path: Path, rank: int, spans: list[tuple[str, str, int, int]]) -> Path:
    """A span file written by hand: (name, lane, start_ns, dur_ns) per span."""
    lines = [{"rank": rank, "label": f"stage {rank} replica 0 (rank {rank})"}]
    lines += [
        {"name": n, "cat": family(n), "lane": lane, "start_ns": s, "dur_ns": d, "args": {}}
        for n, lane, s, d in spans
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _spans_on_disk(path: Path) -> int:
    read = read_span_file(path)
    assert read is not None
    return len(read.spans)


def _x_events(merged: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in merged["traceEvents"] if e["ph"] == "X"}


def _metadata(merged: dict[str, Any], kind: str) -> dict[tuple[int, int | None], Any]:
    events = [e for e in merged["traceEvents"] if e["ph"] == "M" and e["name"] == kind]
    return {(e["pid"], e.get("tid")): next(iter(e["args"].values())) for e in events}


def test_two_recorders_in_two_threads_write_their_own_files(tmp_path: Path) -> None:
    def work(rank: int, lane: str) -> None:
        label = f"stage {rank} replica 0 (rank {rank})"
        recorder = SpanRecorder(tmp_path / f"rank-{rank}.jsonl", rank=rank, label=label)
        for batch in range(50):
            with recorder.span(f"forward m{rank}", lane, batch=batch):
                pass
        recorder.add("send", lane, 1_000, 3_500, where=Path("/not/json"))
        recorder.close()

    lanes = {0: "compute", 1: "send to rank 2"}
    threads = [threading.Thread(target=work, args=item) for item in lanes.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for rank, lane in lanes.items():
        read = read_span_file(tmp_path / f"rank-{rank}.jsonl")
        assert read is not None and read.rank == rank and read.dropped_after is None
        assert read.label == f"stage {rank} replica 0 (rank {rank})"
        assert [s["lane"] for s in read.spans] == [lane] * 51
        assert read.spans[7]["cat"] == "forward" and read.spans[7]["args"] == {"batch": 7}
        assert read.spans[-1] == {
            "name": "send",
            "cat": "send",
            "lane": lane,
            "start_ns": 1_000,
            "dur_ns": 2_500,
            "args": {"where": "/not/json"},
        }


def test_threads_sharing_one_recorder_keep_every_span_whole(tmp_path: Path) -> None:
    recorder = SpanRecorder(tmp_path / "rank-0.jsonl", rank=0, label="r0", flush_every=7)

    def work(lane: str) -> None:
        for i in range(300):
            recorder.add(f"step m{i % 3}", lane, BASE_NS + i, BASE_NS + i + 10)

    threads = [threading.Thread(target=work, args=(f"lane {t}",)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.close()
    lines = (tmp_path / "rank-0.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 4 * 300
    read = read_span_file(tmp_path / "rank-0.jsonl")
    assert read is not None and len(read.spans) == 4 * 300


def test_a_span_is_timed_by_the_wall_clock_and_kept_when_its_body_raises(tmp_path: Path) -> None:
    recorder = SpanRecorder(tmp_path / "rank-0.jsonl", rank=0, label="r0")
    before = time.time_ns()
    with pytest.raises(ValueError), recorder.span("eval", "compute"):
        time.sleep(0.02)
        raise ValueError("the body failed")
    after = time.time_ns()
    recorder.close()
    read = read_span_file(tmp_path / "rank-0.jsonl")
    assert read is not None
    (span,) = read.spans
    assert span["name"] == "eval" and span["cat"] == "eval"
    assert before <= span["start_ns"] and span["start_ns"] + span["dur_ns"] <= after
    assert span["dur_ns"] >= 20 * MS


def test_spans_reach_the_file_every_n_spans_without_close(tmp_path: Path) -> None:
    path = tmp_path / "trace" / "rank-2.jsonl"
    recorder = SpanRecorder(path, rank=2, label="r2", flush_every=3, flush_s=3600)
    read = read_span_file(path)
    assert read is not None and read.rank == 2 and read.spans == []  # the header at once
    for i in range(2):
        recorder.add("receive", "receive from rank 1", BASE_NS + i, BASE_NS + i + 1)
    assert _spans_on_disk(path) == 0
    recorder.add("receive", "receive from rank 1", BASE_NS, BASE_NS + 1)
    assert _spans_on_disk(path) == 3


def test_spans_reach_the_file_after_t_seconds_without_close(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.jsonl"
    recorder = SpanRecorder(path, rank=0, label="r0", flush_every=1000, flush_s=0.05)
    recorder.add("send", "send to rank 1", BASE_NS, BASE_NS + 1)
    assert _spans_on_disk(path) == 0
    time.sleep(0.06)
    recorder.add("send", "send to rank 1", BASE_NS, BASE_NS + 1)
    assert _spans_on_disk(path) == 2


def test_the_limit_drops_later_spans_and_says_so_once(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.jsonl"
    recorder = SpanRecorder(path, rank=0, label="r0", max_spans=3)
    for i in range(10):
        with recorder.span(f"backward m{i}", "compute"):
            pass
    assert not recorder.recording
    recorder.close()
    read = read_span_file(path)
    assert read is not None and read.dropped_after == 3
    assert [s["name"] for s in read.spans] == ["backward m0", "backward m1", "backward m2"]
    assert path.read_text().count("dropped_after") == 1
    summary = merge([path], {}, tmp_path / "trace.json")
    assert summary.dropped == (0,) and summary.spans == 3


def test_a_truncated_last_line_and_a_missing_file_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.jsonl"
    recorder = SpanRecorder(path, rank=0, label="r0")
    for i in range(3):
        recorder.add(f"forward m{i}", "compute", BASE_NS + i * MS, BASE_NS + (i + 1) * MS)
    recorder.close()
    with open(path, "r+b") as file:  # a rank killed in the middle of its last line
        file.truncate(path.stat().st_size - 10)
    read = read_span_file(path)
    assert read is not None and [s["name"] for s in read.spans] == ["forward m0", "forward m1"]
    summary = merge([path, tmp_path / "rank-1.jsonl"], {}, tmp_path / "trace.json")
    assert summary.ranks == (0,) and summary.spans == 2
    assert validate(json.loads((tmp_path / "trace.json").read_text())) == []


@pytest.mark.parametrize(
    ("name", "cat"),
    [
        ("forward m3", "forward"),
        ("backward m0", "backward"),
        ("step m12", "step"),
        ("train batch 17", "train"),
        ("wait for input", "wait_in"),
        ("blocked on outbox", "wait_out"),
        ("send", "send"),
        ("receive", "receive"),
        ("eval", "eval"),
        ("checkpoint", "checkpoint"),
        ("all-reduce", "allreduce"),
        ("stepping stone", "other"),
    ],
)
def test_span_names_fall_in_their_family(name: str, cat: str) -> None:
    assert family(name) == cat


def test_merge_shifts_each_rank_by_exactly_its_offset(tmp_path: Path) -> None:
    (tmp_path / "trace").mkdir()
    rank0 = _span_file(
        tmp_path / "trace" / "rank-0.jsonl",
        0,
        [
            ("train batch 0", "compute", BASE_NS, 10_000),
            ("forward m0", "compute", BASE_NS + 1_000, 2_500),
            ("send", "send to rank 1", BASE_NS + 4_000, 1_000),
        ],
    )
    rank1 = _span_file(
        tmp_path / "trace" / "rank-1.jsonl",
        1,
        [("receive", "receive from rank 0", BASE_NS + 3_000, 500)],
    )
    # rank 1's clock runs 5 us ahead: corrected, its receive is the earliest span (t = 0)
    summary = merge([rank0, rank1], {1: -5_000}, tmp_path / "trace.json")
    merged = json.loads((tmp_path / "trace.json").read_text())
    spans = _x_events(merged)
    expected = {  # name: (ts us, dur us, pid, tid)
        "receive": (0.0, 0.5, 2, 1),
        "train batch 0": (2.0, 10.0, 1, 1),
        "forward m0": (3.0, 2.5, 1, 1),
        "send": (6.0, 1.0, 1, 2),
    }
    assert {n: (e["ts"], e["dur"], e["pid"], e["tid"]) for n, e in spans.items()} == expected
    assert spans["forward m0"]["cat"] == "forward" and spans["forward m0"]["args"] == {}
    assert _metadata(merged, "process_name") == {
        (1, None): "stage 0 replica 0 (rank 0)",
        (2, None): "stage 1 replica 0 (rank 1)",
    }
    assert _metadata(merged, "process_sort_index") == {(1, None): 0, (2, None): 1}
    assert _metadata(merged, "thread_name") == {
        (1, 1): "compute",
        (1, 2): "send to rank 1",
        (2, 1): "receive from rank 0",
    }
    assert merged["displayTimeUnit"] == "ms"
    assert merged["otherData"]["clock_offsets_ns"] == {"0": 0, "1": -5_000}
    assert merged["otherData"]["start_unix_ns"] == BASE_NS - 2_000
    assert summary.spans == 4 and summary.ranks == (0, 1) and summary.dropped == ()
    assert summary.duration_s == pytest.approx(12e-6)
    assert validate(merged) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace", "trace.json"]  # no temp file


def _valid_trace() -> dict[str, Any]:
    return {
        "traceEvents": [
            {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "stage 0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "compute"}},
            {"ph": "X", "name": "step m0", "ts": 1.5, "dur": 2, "pid": 1, "tid": 1},
        ]
    }


def _without_ph(t: dict[str, Any]) -> None:
    del t["traceEvents"][2]["ph"]


def _negative_dur(t: dict[str, Any]) -> None:
    t["traceEvents"][2]["dur"] = -1


def _string_ts(t: dict[str, Any]) -> None:
    t["traceEvents"][2]["ts"] = "1.5"


def _float_tid(t: dict[str, Any]) -> None:
    t["traceEvents"][2]["tid"] = 1.0


def _process_name_without_args(t: dict[str, Any]) -> None:
    del t["traceEvents"][0]["args"]


def _unknown_metadata(t: dict[str, Any]) -> None:
    t["traceEvents"][1]["name"] = "thread_label"


def _events_not_a_list(t: dict[str, Any]) -> None:
    t["traceEvents"] = {"0": t["traceEvents"][0]}


@pytest.mark.parametrize(
    ("breakage", "problem"),
    [
        (_without_ph, "event 2: ph is None"),
        (_negative_dur, "event 2: dur is not a number >= 0"),
        (_string_ts, "event 2: ts is not a number >= 0"),
        (_float_tid, "event 2: tid is not an integer"),
        (_process_name_without_args, "event 0: args.name is not a str"),
        (_unknown_metadata, "event 1: metadata name 'thread_label' is not one of"),
        (_events_not_a_list, "traceEvents is not a list"),
    ],
)
def test_validate_names_each_broken_structure(breakage: Any, problem: str) -> None:
    broken = _valid_trace()
    assert validate(broken) == []
    breakage(broken)
    (found,) = validate(broken)
    assert found.startswith(problem)


def test_clock_offsets_take_the_observation_with_least_delay() -> None:
    offsets = ClockOffsets()
    for sent, received in [(100, 1_150), (200, 1_210), (300, 1_400)]:
        offsets.observe(0, sent, received)
    offsets.observe(1, 5_000, 1_000)  # a rank whose clock is ahead: negative offset
    assert offsets.offset_ns(0) == 1_010
    assert offsets.offset_ns(1) == -4_000
    assert offsets.offset_ns(2) == 0  # never heard from
    assert offsets.as_dict() == {0: 1_010, 1: -4_000}


class _FillingFile(io.StringIO):
    """A file on a disk with room for the first write only."""

    def write(self, text: str) -> int:
        if self.tell() > 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(text)


def _failing_path(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if case == "disk fills mid-run":
        monkeypatch.setattr(spans, "open", lambda *a, **k: _FillingFile(), raising=False)
    if case == "disk is full":
        return Path("/dev/full")  # every write fails with ENOSPC
    if case == "directory cannot be made":
        (tmp_path / "a file").write_text("")
        return tmp_path / "a file" / "rank-0.jsonl"
    return tmp_path / "rank-0.jsonl"


@pytest.mark.parametrize("case", ["disk fills mid-run", "disk is full", "directory cannot be made"])
def test_a_failing_write_stops_tracing_with_one_warning(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = _failing_path(case, tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=spans.__name__):
        recorder = SpanRecorder(path, rank=0, label="r0", flush_every=1)
        for i in range(5):
            with recorder.span("forward m0", "compute"):
                pass
            recorder.add("send", "send to rank 1", i, i + 1)
        recorder.close()
    assert not recorder.recording
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "tracing stopped" in warning.getMessage() and str(path) in warning.getMessage()


def _pipeline_span_files(tmp_path: Path, batches: int) -> list[Path]:
    """Two ranks of a pipeline: rank 1 runs each batch 4 ms after rank 0; a batch takes 8 of
    every 10 ms (forward, backward, step inside it)."""
    files = []
    for rank in range(2):
        recorder = SpanRecorder(tmp_path / f"rank-{rank}.jsonl", rank=rank, label=f"stage {rank}")
        for i in range(batches):
            t = BASE_NS + (4 * rank + 10 * i) * MS
            recorder.add(f"train batch {i}", "compute", t, t + 8 * MS)
            recorder.add(f"forward m{rank}", "compute", t, t + 2 * MS)
            recorder.add(f"backward m{rank}", "compute", t + 2 * MS, t + 6 * MS)
            recorder.add(f"step m{rank}", "compute", t + 6 * MS, t + 8 * MS)
            lane = "send to rank 1" if rank == 0 else "receive from rank 0"
            recorder.add("send" if rank == 0 else "receive", lane, t + 8 * MS, t + 9 * MS)
            if rank == 1:
                recorder.add("wait for input", "compute", t - 2 * MS, t)
        recorder.close()
        files.append(recorder.path)
    return files


def test_the_default_window_starts_after_the_last_ranks_fifth_batch(tmp_path: Path) -> None:
    merge(_pipeline_span_files(tmp_path, batches=20), {}, tmp_path / "trace.json")
    # the trace starts with rank 0's first batch; rank 1's batch i ends at 12 + 10 i ms
    assert default_window(tmp_path / "trace.json") == pytest.approx((0.052, 0.172))
    # fewer batches than asked for: 1 s, or to the end of the trace (rank 1's last receive)
    assert default_window(tmp_path / "trace.json", steps=100) == pytest.approx((0.052, 0.203))


def test_plot_timeline_draws_a_png_of_a_small_pipeline(tmp_path: Path) -> None:
    merge(_pipeline_span_files(tmp_path, batches=20), {}, tmp_path / "trace.json")
    out = plot_timeline(tmp_path / "trace.json", tmp_path / "timeline.png")
    assert out == tmp_path / "timeline.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    explicit = plot_timeline(tmp_path / "trace.json", tmp_path / "all.png", window_s=(0.0, 0.3))
    assert explicit is not None and explicit.stat().st_size > 10_000


def test_plot_timeline_returns_none_when_there_is_nothing_to_draw(tmp_path: Path) -> None:
    assert plot_timeline({"traceEvents": []}, tmp_path / "empty.png") is None
    merge(_pipeline_span_files(tmp_path, batches=2), {}, tmp_path / "trace.json")
    after_the_end = (5.0, 6.0)
    assert (
        plot_timeline(tmp_path / "trace.json", tmp_path / "late.png", window_s=after_the_end)
        is None
    )
    assert not list(tmp_path.glob("*.png"))


def test_the_disabled_recorder_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    recorder = NullRecorder()
    spans = [recorder.span("forward m0", "compute", batch=i) for i in range(3)]
    assert spans[0] is spans[1] is spans[2]  # one shared no-op: nothing is made per batch
    with spans[0]:
        pass
    recorder.add("send", "send to rank 1", 0, 1)
    recorder.close()
    assert list(tmp_path.iterdir()) == []
