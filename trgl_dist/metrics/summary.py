"""summary.json: per-module accuracies, the best module, epoch times, and per-stage figures."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from trgl_dist.atomic import atomic_write
from trgl_dist.metrics.failure import Failure
from trgl_dist.metrics.records import (
    EndRecord,
    EpochRecord,
    EvalRecord,
    Record,
    StageRecord,
    TrainRecord,
    of_kind,
)
from trgl_dist.rundir import SUMMARY_FILE


def module_summaries(records: Sequence[Record], num_modules: int) -> list[dict[str, Any]]:
    accuracies: dict[int, list[float]] = {k: [] for k in range(num_modules)}
    for rec in of_kind(records, EvalRecord):
        if rec.module in accuracies:
            accuracies[rec.module].append(rec.accuracy)
    return [
        {
            "module": k,
            "test_accuracy": accs[-1] if accs else None,
            "best_test_accuracy": max(accs) if accs else None,
        }
        for k, accs in accuracies.items()
    ]


def cuda_peaks(records: Sequence[Record]) -> dict[int, float]:
    """Each stage's highest CUDA peak over its records: the stage resets the allocator's peak
    at every epoch, so each record holds its epoch's peak so far."""
    peaks: dict[int, float] = {}
    for rec in records:
        if isinstance(rec, StageRecord) and rec.cuda_peak_mb is not None:
            peaks[rec.stage] = max(peaks.get(rec.stage, 0.0), rec.cuda_peak_mb)
    return peaks


def stage_summaries(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One entry per stage, from each of its ranks' last end record (a resumed run ends more
    than once): its replicas' samples add up, their time shares and step times are
    averaged, their memory is the largest."""
    last_end: dict[int, EndRecord] = {r.rank: r for r in of_kind(records, EndRecord)}
    by_stage: dict[int, list[EndRecord]] = {}
    for end in last_end.values():
        by_stage.setdefault(end.stage, []).append(end)
    peaks = cuda_peaks(records)
    return [_stage_entry(stage, ends, peaks.get(stage)) for stage, ends in sorted(by_stage.items())]


def _stage_entry(stage: int, ends: list[EndRecord], cuda_peak: float | None) -> dict[str, Any]:
    def share(part: Callable[[EndRecord], float]) -> float:
        fractions = [part(e) / (e.busy_s + e.wait_in_s + e.wait_out_s or 1.0) for e in ends]
        return statistics.fmean(fractions)  # all zero: shares are 0

    def largest(values: Iterable[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return max(known) if known else None

    steps = [e.step_ms for e in ends if e.step_ms is not None]
    stalenesses = [e.staleness_mean for e in ends if e.staleness_mean is not None]
    return {
        "stage": stage,
        "replicas": len(ends),
        "modules": list(ends[0].modules),
        "busy": share(lambda e: e.busy_s),
        "wait": share(lambda e: e.wait_in_s + e.wait_out_s),
        "wait_in": share(lambda e: e.wait_in_s),
        "wait_out": share(lambda e: e.wait_out_s),
        "samples_per_s": sum(e.samples_per_s for e in ends),
        "peak_rss_mb": largest(e.peak_rss_mb for e in ends),
        "peak_tensor_mb": largest(e.peak_tensor_mb for e in ends),
        "cuda_peak_mb": cuda_peak,
        "step_ms": statistics.fmean(steps) if steps else None,
        "step_peak_mb": largest(e.step_peak_mb for e in ends),
        "bytes_sent": sum(e.bytes_sent for e in ends),
        "staleness_mean": statistics.fmean(stalenesses) if stalenesses else None,
    }


def epoch_times(records: Sequence[Record]) -> list[float]:
    # Last record wins per epoch: a resumed run may repeat the epoch it was stopped in.
    seconds = {r.epoch: r.seconds for r in of_kind(records, EpochRecord)}
    return [seconds[epoch] for epoch in sorted(seconds)]


def overall_samples_per_s(
    records: Sequence[Record], stages: list[dict[str, Any]], times: list[float]
) -> float | None:
    """Runs with a stage clock: the slowest stage. Else data samples per second of epoch time."""
    stage_rates = [s["samples_per_s"] for s in stages]
    if stage_rates:
        return float(min(stage_rates))
    # Per epoch, the module that trained most saw the data pass (sequential trains one at a time).
    per_epoch_module: Counter[tuple[int, int]] = Counter()
    for rec in of_kind(records, TrainRecord):
        per_epoch_module[(rec.epoch, rec.module)] += rec.samples
    per_epoch: dict[int, float] = {}
    for (epoch, _module), samples in per_epoch_module.items():
        per_epoch[epoch] = max(per_epoch.get(epoch, 0), samples)
    total_seconds = sum(times)
    if total_seconds <= 0 or not per_epoch:
        return None
    return sum(per_epoch.values()) / total_seconds


def summarize(
    records: Sequence[Record],
    *,
    regime: str,
    num_modules: int,
    failure: Failure | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of summary.json; keys of ``extra`` are added last and win."""
    modules = module_summaries(records, num_modules)
    finals = [(m["test_accuracy"], m["module"]) for m in modules if m["test_accuracy"] is not None]
    # max() keeps the first of equals: on a tie the shallower, cheaper module wins.
    best = max(finals, key=lambda pair: pair[0]) if finals else (None, None)
    stages = stage_summaries(records)
    times = epoch_times(records)
    summary: dict[str, Any] = {
        "regime": regime,
        "num_modules": num_modules,
        "modules": modules,
        "last_module_accuracy": modules[-1]["test_accuracy"] if modules else None,
        "best_module": best[1],
        "best_module_accuracy": best[0],
        "epoch_times": times,
        "samples_per_s": overall_samples_per_s(records, stages, times),
        "stages": stages,
        "failure": failure.as_dict() if failure is not None else None,
    }
    summary.update(extra or {})
    return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write summary.json atomically: readers see the old file or the new one, never half."""
    text = (json.dumps(summary, indent=2) + "\n").encode("utf-8")
    atomic_write(Path(run_dir) / SUMMARY_FILE, lambda out: out.write(text))
