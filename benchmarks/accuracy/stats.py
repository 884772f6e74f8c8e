"""Means and 95% t confidence intervals over seeds, and the aggregates the tables show."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (beyond: the normal 1.96).
T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 samples (df >= 1), got df={df}")
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """mean ± t_{0.975,n-1} * sd / sqrt(n); the half-width is None for a single value."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None, "values": []}
    half = t975(n - 1) * float(x.std(ddof=1)) / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": float(x.mean()), "ci95": half, "values": x.tolist()}


def ok_runs(results: Iterable[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in results
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())
    ]


def with_depth_trend(record: dict[str, Any]) -> dict[str, Any]:
    """The record plus its depth trend: accuracy after the last module minus after K/2."""
    acc = record.get("module_accuracy") or []
    mid = acc[len(acc) // 2 - 1] if len(acc) > 1 else None
    trend = acc[-1] - mid if mid is not None and acc[-1] is not None else None
    return {**record, "depth_trend": trend}


def group_stats(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Last, best and training accuracy, best - last, and the depth trend (``with_depth_trend``)."""
    last = [r["last_module_accuracy"] for r in runs]
    best = [r["best_module_accuracy"] for r in runs]
    train = [r["last_train_accuracy"] for r in runs if r.get("last_train_accuracy") is not None]
    return {
        "last": mean_ci(last),
        "best": mean_ci(best),
        "train": mean_ci(train),
        "drop": mean_ci([b - a for a, b in zip(last, best, strict=True)]),
        "trend": mean_ci([r["depth_trend"] for r in runs if r.get("depth_trend") is not None]),
        "seeds": [r["seed"] for r in runs],
    }


def welch_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(a) - mean(b) of two independent samples, with a 95% Welch t interval."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or len(y) < 2:
        return {"n": min(len(x), len(y)), "mean": None, "ci95": None, "values": []}
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1)) if se else len(x) - 1
    return {
        "n": min(len(x), len(y)),
        "mean": float(x.mean() - y.mean()),
        "ci95": t975(max(int(df), 1)) * se,
        "values": [],
    }


def paired_difference(
    a_runs: Sequence[dict[str, Any]], b_runs: Sequence[dict[str, Any]], key: str
) -> dict[str, Any]:
    """CI of a - b over the seeds both have (same seed: same data subset and initial weights)."""
    return mean_ci(list(differences_by_seed(a_runs, b_runs, key).values()))


def differences_by_seed(
    a_runs: Sequence[dict[str, Any]], b_runs: Sequence[dict[str, Any]], key: str
) -> dict[int, float]:
    """a - b per seed, over the seeds both have."""
    b_by_seed = {r["seed"]: r[key] for r in b_runs}
    return {r["seed"]: r[key] - b_by_seed[r["seed"]] for r in a_runs if r["seed"] in b_by_seed}


def per_module(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and CI of the accuracy after each module, over seeds."""
    if not runs:
        return []
    depth = len(runs[0]["module_accuracy"])
    return [mean_ci([r["module_accuracy"][k] for r in runs]) for k in range(depth)]


def per_module_difference(
    a_runs: Sequence[dict[str, Any]], b_runs: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Paired (same seed) a - b of the accuracy after each module."""
    b_by_seed = {r["seed"]: r["module_accuracy"] for r in b_runs}
    pairs = [(r["module_accuracy"], b_by_seed[r["seed"]]) for r in a_runs if r["seed"] in b_by_seed]
    if not pairs:
        return []
    return [mean_ci([a[k] - b[k] for a, b in pairs]) for k in range(len(pairs[0][0]))]


def fmt(stat: dict[str, Any] | None, scale: float = 100.0) -> str:
    """'88.12 ± 0.53' in percent; a lone value has no interval; nothing is '—'."""
    if not stat or stat.get("mean") is None:
        return "—"
    text = f"{stat['mean'] * scale:.2f}"
    if stat.get("ci95") is not None:
        text += f" ± {stat['ci95'] * scale:.2f}"
    return text


def excludes_zero(stat: dict[str, Any]) -> bool | None:
    """Whether the 95% interval lies entirely on one side of 0 (None without an interval)."""
    if stat.get("ci95") is None or stat.get("mean") is None:
        return None
    return abs(stat["mean"]) > stat["ci95"]
