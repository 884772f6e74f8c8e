"""From a pipeline run directory to its numbers: steady samples/s, stage fractions, transport."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trgl_dist.metrics.records import EndRecord, Record, StageRecord, read_records
from trgl_dist.rundir import METRICS_FILE, SUMMARY_FILE


def _elapsed(record: StageRecord) -> float:
    """A stage record's seconds since the stage started (it carries samples and their rate)."""
    rate = record.samples_per_s
    return record.samples / rate if rate > 0 else 0.0


def steady_rate(records: list[Record], stage: int) -> tuple[float, str]:
    """The last stage's samples/s after its first periodic record (start-up and fill
    excluded), or over its whole life when the run was too short to hold one."""
    mine = [r for r in records if isinstance(r, StageRecord) and r.stage == stage]
    end = [r for r in mine if isinstance(r, EndRecord)][-1]
    first = next((r for r in mine if type(r) is StageRecord and r.samples > 0), None)
    if first is not None and end.samples > first.samples:
        seconds = _elapsed(end) - _elapsed(first)
        return (end.samples - first.samples) / seconds, "steady (after first stage record)"
    return float(end.samples_per_s), "whole stage life (fill included)"


def stage_rows(records: list[Record], summary: dict[str, Any], batch: int) -> list[dict]:
    """Per stage: busy/wait fractions, send seconds per batch, transport/compute."""
    ends = {r.stage: r for r in records if isinstance(r, EndRecord)}
    rows = []
    for stage in summary["stages"]:
        end = ends[stage["stage"]]
        steps = max(end.samples / batch, 1.0)
        compute = end.busy_s / steps
        sent = end.batches_sent
        send = end.seconds_sending / sent if sent else None
        rows.append(
            {
                "stage": stage["stage"],
                "busy": stage["busy"],
                "wait_in": stage["wait_in"],
                "wait_out": stage["wait_out"],
                "compute_s_per_step": compute,
                "send_s_per_batch": send,
                "transport_over_compute": send / compute if send is not None else None,
                "bytes_per_batch": end.bytes_sent / sent if sent else None,
            }
        )
    return rows


def pipeline_numbers(run_dir: Path, batch: int, stage_step_s: list[float]) -> dict[str, Any]:
    """Everything (c) reports, with efficiency against the slowest standalone stage."""
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    records = read_records(run_dir / METRICS_FILE)
    last = max(s["stage"] for s in summary["stages"])
    rate, how = steady_rate(records, last)
    bound = batch / max(stage_step_s)
    return {
        "samples_per_s": rate,
        "measured": how,
        "summary_samples_per_s": summary["samples_per_s"],
        "blocks_per_module": summary.get("blocks_per_module"),
        "stage_step_s": stage_step_s,
        "bound_samples_per_s": bound,
        "efficiency": rate / bound,
        "stages": stage_rows(records, summary, batch),
    }
