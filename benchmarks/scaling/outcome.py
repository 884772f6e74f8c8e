"""From a run directory to its numbers: steady samples/s, and each stage's predicted and
measured step time and peak memory with the planner's error; then medians over repeats.

Throughput is the last stage's (every batch passes it once), summed over its replicas,
each replica over its steady window (`benchmarks/windows.py`): after start-up and the
pipeline's fill, before its last training batch, so the run's only test pass and its
checkpoint fall outside. A run too short for one (a smoke test) is counted over the
stage's whole life and says so.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from windows import STEADY, WHOLE, stage_window

from trgl_dist.metrics.records import EndRecord, Record, read_records
from trgl_dist.rundir import METRICS_FILE, SUMMARY_FILE


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured, the sign convention of the run's report.md."""
    if predicted is None or measured is None or measured <= 0:
        return None
    return (predicted - measured) / measured


def replica_rate(records: Sequence[Record], stage: int, replica: int) -> tuple[float, str]:
    """One replica's samples/s over its steady window (or its whole life)."""
    window = stage_window(list(records), stage, replica)
    return window.samples / window.seconds, window.how


def throughput(records: Sequence[Record]) -> tuple[float, str]:
    """The pipeline's samples/s: its last stage's replicas' rates, summed."""
    ends = [r for r in records if isinstance(r, EndRecord)]
    if not ends:
        raise RuntimeError("no stage wrote an end record")
    last = max(r.stage for r in ends)
    rates = [
        replica_rate(records, last, rep)
        for rep in sorted({r.replica for r in ends if r.stage == last})
    ]
    window = STEADY if all(how == STEADY for _, how in rates) else WHOLE
    return sum(rate for rate, _ in rates), window


def stage_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each stage's prediction (from the planner inside the run, for the layout it ran)
    beside its measurement: mean step compute after warm-up over the replicas, and the
    largest replica's step memory."""
    predicted = (summary.get("prediction") or {}).get("stages") or []
    rows = []
    for s, stage in enumerate(summary["stages"]):
        plan = predicted[s] if s < len(predicted) else {}
        step, peak = stage.get("step_ms"), stage.get("step_peak_mb")
        rows.append(
            {
                "stage": stage["stage"],
                "modules": [m + 1 for m in stage["modules"]],  # 1-based, as the logs and plan
                "replicas": stage["replicas"],
                "predicted_step_ms": plan.get("step_ms"),
                "step_ms": step,
                "step_error": relative_error(plan.get("step_ms"), step),
                "predicted_peak_mib": plan.get("peak_mib"),
                "peak_mib": peak,
                "peak_error": relative_error(plan.get("peak_mib"), peak),
            }
        )
    return rows


def run_numbers(run_dir: Path) -> dict[str, Any]:
    """What one run measured and what its planner predicted."""
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    rate, window = throughput(read_records(run_dir / METRICS_FILE))
    predicted = (summary.get("prediction") or {}).get("samples_per_s")
    return {
        "samples_per_s": rate,
        "window": window,
        "summary_samples_per_s": summary.get("samples_per_s"),
        "predicted_samples_per_s": predicted,
        "throughput_error": relative_error(predicted, rate),
        "blocks_per_module": summary.get("blocks_per_module"),
        "stage_replicas": summary.get("stage_replicas"),
        "stages": stage_rows(summary),
    }


def spread(values: Sequence[float | None]) -> dict[str, Any] | None:
    """Median, min and max of the repeats' values (None when a repeat has none)."""
    if not values or any(v is None for v in values):
        return None
    known = [float(v) for v in values if v is not None]
    return {
        "median": statistics.median(known),
        "min": min(known),
        "max": max(known),
        "values": known,
    }


def _over(runs: Sequence[dict[str, Any]], value: Callable[[dict[str, Any]], Any]) -> Any:
    return spread([value(r) for r in runs])


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """An experiment's repeats: every number as median [min-max]."""
    stages = []
    for s, first in enumerate(runs[0]["stages"]):
        stage = {key: first[key] for key in ("stage", "modules", "replicas")}
        for key in ("predicted_step_ms", "step_ms", "step_error", "predicted_peak_mib",
                    "peak_mib", "peak_error"):  # fmt: skip
            stage[key] = _over(runs, lambda r, key=key, s=s: r["stages"][s][key])
        stages.append(stage)
    return {
        "samples_per_s": _over(runs, lambda r: r["samples_per_s"]),
        "summary_samples_per_s": _over(runs, lambda r: r["summary_samples_per_s"]),
        "predicted_samples_per_s": _over(runs, lambda r: r["predicted_samples_per_s"]),
        "throughput_error": _over(runs, lambda r: r["throughput_error"]),
        "steady_runs": sum(r["window"] == STEADY for r in runs),
        "stages": stages,
    }


def module_steps(runs: Sequence[dict[str, Any]], modules: int) -> list[dict[str, Any] | None]:
    """Each module's measured step where a stage held it alone, on one rank (the splits
    without replicas have one such stage per module): median [min-max] over those runs."""
    steps: list[list[float]] = [[] for _ in range(modules)]
    for run in runs:
        for stage in run["stages"]:
            if len(stage["modules"]) == 1 and stage["replicas"] == 1 and stage["step_ms"]:
                steps[stage["modules"][0] - 1].append(stage["step_ms"])
    return [spread(values) for values in steps]
