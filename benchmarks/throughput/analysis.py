"""From a pipeline run directory to its numbers: steady samples/s, stage fractions, transport.

Every rate and per-step time here is taken over a stage's **steady window**: between two of
its own cumulative records in `metrics.jsonl`, the first periodic `stage` record (about 2 s
in, after start-up and the pipeline's fill) and the last periodic one written before the
stage had trained its last batch (fewer samples than its `end` record). The run's only
test pass (`--eval-every 0`, one small synthetic test batch) and its checkpoint come after
the last training batch, so neither is in the window. A run too short to hold two such
records falls back to the stage's whole life (start-up, fill, test pass and checkpoint
included), and says so.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from windows import stage_window

from trgl_dist.metrics.records import EndRecord, Record, read_records
from trgl_dist.rundir import METRICS_FILE, SUMMARY_FILE


def steady_rate(records: list[Record], stage: int) -> tuple[float, str]:
    """The stage's samples/s over its steady window."""
    window = stage_window(records, stage)
    return window.samples / window.seconds, window.how


def stage_rows(records: list[Record], summary: dict[str, Any], batch: int) -> list[dict]:
    """Per stage, over its steady window: busy seconds per step (the in-run step time),
    busy/wait fractions, send seconds per batch, transport/compute."""
    ends = {r.stage: r for r in records if isinstance(r, EndRecord)}
    rows = []
    for stage in summary["stages"]:
        s = stage["stage"]
        window = stage_window(records, s)
        steps = max(window.samples / batch, 1.0)
        compute = window.delta("busy_s") / steps
        sent = window.delta("batches_sent")
        send = window.delta("seconds_sending") / sent if sent else None
        seconds = window.seconds
        end = ends[s]
        life_steps = max(end.samples / batch, 1.0)
        rows.append(
            {
                "stage": s,
                "busy": window.delta("busy_s") / seconds,
                "wait_in": window.delta("wait_in_s") / seconds,
                "wait_out": window.delta("wait_out_s") / seconds,
                "compute_s_per_step": compute,
                # The former figure: busy seconds of the whole life (warm-up, test pass and
                # checkpoint included) over the training steps.
                "compute_s_per_step_life": end.busy_s / life_steps,
                "send_s_per_batch": send,
                "transport_over_compute": send / compute if send is not None else None,
                "bytes_per_batch": end.bytes_sent / end.batches_sent if end.batches_sent else None,
                "window": window.describe(batch),
                # Whole life, as summary.json has them.
                "busy_life": stage["busy"],
                "wait_in_life": stage["wait_in"],
                "wait_out_life": stage["wait_out"],
            }
        )
    return rows


def pipeline_numbers(
    run_dir: Path, batch: int, alone: list[dict[str, Any]], corun: list[dict[str, Any]]
) -> dict[str, Any]:
    """Everything (c) reports, with its efficiency against the slowest stage alone and
    against the slowest stage co-run; ``alone``/``corun``: per stage, the standalone
    summaries (``median_s``, ``min_s``, ``max_s``, ``repeats_s``)."""
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    records = read_records(run_dir / METRICS_FILE)
    last = max(s["stage"] for s in summary["stages"])
    rate, how = steady_rate(records, last)
    alone_s = [a["median_s"] for a in alone]
    corun_s = [c["median_s"] for c in corun]
    bound = batch / max(alone_s)
    corun_bound = batch / max(corun_s)
    rows = sorted(stage_rows(records, summary, batch), key=lambda row: row["stage"])
    for row in rows:
        a, c = alone[row["stage"]], corun[row["stage"]]
        row["alone"], row["corun"] = a, c
        row["corun_over_alone"] = c["median_s"] / a["median_s"]
        row["inrun_over_corun"] = row["compute_s_per_step"] / c["median_s"]
        row["inrun_over_alone"] = row["compute_s_per_step"] / a["median_s"]
    return {
        "samples_per_s": rate,
        "measured": how,
        "summary_samples_per_s": summary["samples_per_s"],
        "blocks_per_module": summary.get("blocks_per_module"),
        "stage_step_s": alone_s,
        "corun_step_s": corun_s,
        "bound_samples_per_s": bound,
        "efficiency": rate / bound,
        "corun_bound_samples_per_s": corun_bound,
        "efficiency_corun": rate / corun_bound,
        "stages": rows,
    }


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}  # fmt: skip


def combine_runs(
    runs: list[dict[str, Any]], alone: list[dict[str, Any]], corun: list[dict[str, Any]],
    batch: int,
) -> dict[str, Any]:
    """Repeated (c) runs of one (K, split), each as ``pipeline_numbers`` gave it against the
    standalone repeat just before it: medians over the runs, of the rates and efficiencies
    and, per stage, of the in-run step and of the paired ratios (their spread kept beside
    them); ``alone``/``corun``: per stage, the standalone summaries over every repeat."""
    alone_s = [a["median_s"] for a in alone]
    corun_s = [c["median_s"] for c in corun]
    stages = []
    for s, first in enumerate(runs[0]["stages"]):
        rows = [run["stages"][s] for run in runs]
        merged = {
            key: statistics.median(row[key] for row in rows)
            if all(isinstance(row[key], int | float) for row in rows)
            and any(row[key] != value for row in rows) else value
            for key, value in first.items()
        }  # fmt: skip
        for key in ("compute_s_per_step", "inrun_over_corun", "corun_over_alone",
                    "inrun_over_alone"):  # fmt: skip
            merged[f"{key}_spread"] = _spread([row[key] for row in rows])
        merged["alone"], merged["corun"] = alone[s], corun[s]
        merged["window"] = {**first["window"],
                            "steps": statistics.median(row["window"]["steps"] for row in rows)}
        stages.append(merged)
    med = {key: statistics.median(run[key] for run in runs)
           for key in ("samples_per_s", "summary_samples_per_s", "efficiency", "efficiency_corun")}
    return {
        **med,
        "samples_per_s_spread": _spread([run["samples_per_s"] for run in runs]),
        "efficiency_corun_spread": _spread([run["efficiency_corun"] for run in runs]),
        "measured": runs[0]["measured"],
        "blocks_per_module": runs[0]["blocks_per_module"],
        "stage_step_s": alone_s,
        "corun_step_s": corun_s,
        "bound_samples_per_s": batch / max(alone_s),
        "corun_bound_samples_per_s": batch / max(corun_s),
        "stages": stages,
        "runs": runs,
    }
