"""The timeline picture of the report: a short window of the merged trace, one row per
rank and lane, spans coloured by family (matplotlib, imported only to draw)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trgl_dist.metrics.spans import FAMILIES, OTHER


def _load(trace: Mapping[str, Any] | Path) -> Mapping[str, Any]:
    if isinstance(trace, Mapping):
        return trace
    with open(trace, encoding="utf-8") as file:
        return json.load(file)


def _spans(trace: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]


def default_window(
    trace: Mapping[str, Any] | Path, *, start_after: int = 5, steps: int = 12
) -> tuple[float, float] | None:
    """Seconds from the trace's start to show: the pipeline full and running. It starts
    when the last rank has finished ``start_after`` training batches (the first ones include
    the fill) and lasts its next ``steps`` batches, or 1 s where fewer were recorded."""
    spans = _spans(_load(trace))
    if not spans:
        return None
    last_pid = max(s["pid"] for s in spans)
    ends = sorted(
        s["ts"] + s["dur"] for s in spans if s["pid"] == last_pid and s.get("cat") == "train"
    )
    start = ends[start_after - 1] if 0 < start_after <= len(ends) else min(s["ts"] for s in spans)
    later = [end for end in ends if end > start]
    trace_end = max(s["ts"] + s["dur"] for s in spans)
    end = later[steps - 1] if len(later) >= steps else min(start + 1e6, trace_end)
    return start / 1e6, end / 1e6


def _depths(spans: list[dict[str, Any]]) -> list[int]:
    """Nesting depth of each span of one lane, sorted parents first ("forward m3" inside
    "train batch 17" is 1), so nested spans are drawn thinner on top of their parent."""
    ends: list[float] = []
    depths = []
    for span in spans:
        while ends and ends[-1] <= span["ts"]:
            ends.pop()
        depths.append(len(ends))
        ends.append(span["ts"] + span["dur"])
    return depths


def _lane_labels(
    trace: Mapping[str, Any], spans: list[dict[str, Any]]
) -> dict[tuple[int, int], str]:
    """(pid, tid) -> "stage 0 replica 1 (rank 1) / compute", first rank first."""
    meta = [e for e in trace["traceEvents"] if e.get("ph") == "M"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    lanes = sorted({(s["pid"], s["tid"]) for s in spans})
    return {
        (pid, tid): f"{processes.get(pid, f'pid {pid}')} / {threads.get((pid, tid), f'tid {tid}')}"
        for pid, tid in lanes
    }


def _bars(
    spans: list[dict[str, Any]], rows: Mapping[tuple[int, int], int], start_us: float
) -> dict[tuple[int, int, str], list[tuple[float, float]]]:
    """(depth, row, family) -> [(start, length) in ms from the window's start]."""
    lanes: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for span in sorted(spans, key=lambda s: (s["ts"], -s["dur"])):
        lanes.setdefault((span["pid"], span["tid"]), []).append(span)
    bars: dict[tuple[int, int, str], list[tuple[float, float]]] = {}
    for lane, in_lane in lanes.items():
        row = rows[lane]
        for span, depth in zip(in_lane, _depths(in_lane)):
            bar = ((span["ts"] - start_us) / 1000, span["dur"] / 1000)
            bars.setdefault((depth, row, span.get("cat", "other")), []).append(bar)
    return bars


def plot_timeline(
    trace: Mapping[str, Any] | Path,
    out_png: Path,
    *,
    window_s: tuple[float, float] | None = None,
    start_after: int = 5,
    steps: int = 12,
) -> Path | None:
    """Draw one row per (rank, lane) over a short window (default_window unless given, in
    seconds from the trace's start), spans coloured by family. None when nothing to draw."""
    from matplotlib.figure import Figure  # not pyplot: this runs in a background process
    from matplotlib.patches import Patch

    trace = _load(trace)
    spans = _spans(trace)
    window = (
        default_window(trace, start_after=start_after, steps=steps)
        if window_s is None
        else window_s
    )
    if window is None:
        return None
    start_us, end_us = window[0] * 1e6, window[1] * 1e6
    shown = [s for s in spans if s["ts"] < end_us and s["ts"] + s["dur"] > start_us]
    if not shown:
        return None
    labels = _lane_labels(trace, spans)
    bars = _bars(shown, {lane: row for row, lane in enumerate(labels)}, start_us)
    fig = Figure(figsize=(11, 1.5 + 0.3 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    colors = {cat: (prefix, color) for prefix, cat, color in (*FAMILIES, OTHER)}
    for (depth, row, cat), ranges in sorted(bars.items()):  # parents first, children on top
        height = 0.8 * 0.65**depth
        color = colors.get(cat, colors["other"])[1]
        ax.broken_barh(ranges, (row - height / 2, height), facecolors=color)
    present = {cat for _, _, cat in bars}
    handles = [
        Patch(color=c, label=prefix) for cat, (prefix, c) in colors.items() if cat in present
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.set_yticks(range(len(labels)), list(labels.values()), fontsize="small")
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first rank on top
    ax.set_xlim(0, (end_us - start_us) / 1000)
    ax.set_xlabel(f"ms after {window[0]:.3f} s from the start of the trace")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(out_png, dpi=110)
    return Path(out_png)
