"""The plan against the run: each stage's predicted step time and peak memory beside what
the stage measured (its mean training-step compute after warm-up; one step's tensors by
MemTracker with the batches queued around it)."""

from __future__ import annotations

from typing import Any


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured, or None without both."""
    if predicted is None or measured is None or measured <= 0:
        return None
    return (predicted - measured) / measured


def plan_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage that has both a prediction and a measurement."""
    predicted = (summary.get("prediction") or {}).get("stages") or []
    rows = []
    for stage in summary.get("stages") or []:
        index = stage["stage"]
        if index >= len(predicted):
            continue
        plan = predicted[index]
        rows.append({
            "stage": index,
            "replicas": plan["replicas"],
            "predicted_step_ms": plan["step_ms"],
            "step_ms": stage.get("step_ms"),
            "step_error": relative_error(plan["step_ms"], stage.get("step_ms")),
            "predicted_peak_mib": plan["peak_mib"],
            "peak_mib": stage.get("step_peak_mb"),
            "peak_error": relative_error(plan["peak_mib"], stage.get("step_peak_mb")),
        })
    return rows


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _err(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def plan_table(summary: dict[str, Any]) -> list[str]:
    """Markdown lines: the plan's prediction and the measurement, stage by stage."""
    rows = plan_rows(summary)
    if not rows:
        return []
    lines = [
        "| stage | replicas | step ms, predicted | step ms, measured | error "
        "| peak MiB, predicted | peak MiB, measured | error |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['replicas']} | {_num(r['predicted_step_ms'])} "
            f"| {_num(r['step_ms'])} | {_err(r['step_error'])} "
            f"| {_num(r['predicted_peak_mib'])} | {_num(r['peak_mib'])} "
            f"| {_err(r['peak_error'])} |"
        )
    rate = (summary.get("prediction") or {}).get("samples_per_s")
    measured = summary.get("samples_per_s")
    lines += [
        "",
        f"Throughput: {_num(rate)} samples/s predicted, {_num(measured)} measured "
        f"({_err(relative_error(rate, measured))}).",
    ]
    return lines


def plan_console_line(summary: dict[str, Any], stage: int) -> str:
    """", step 49.6 ms (plan 50.1), peak 12 MiB (plan 11)" for a stage, or ""."""
    for r in plan_rows(summary):
        if r["stage"] == stage and r["step_ms"] is not None:
            peak, planned = _num(r["peak_mib"], ".0f"), _num(r["predicted_peak_mib"], ".0f")
            return (
                f", step {_num(r['step_ms'])} ms (plan {_num(r['predicted_step_ms'])}), "
                f"peak {peak} MiB (plan {planned})"
            )
    return ""
