"""The markdown tables of the study, each with the numbers behind it (for results.json)."""

from __future__ import annotations

from typing import Any

from experiments import METHOD_LABELS, MODULEWISE, Preset
from stats import (
    differences_by_seed,
    fmt,
    group_stats,
    mean_ci,
    ok_runs,
    paired_difference,
    per_module_difference,
)

Rows = list[str]
METHODS = (*MODULEWISE, "multipliers", "e2e")
LAST, BEST, TREND = "last_module_accuracy", "best_module_accuracy", "depth_trend"


def _head(*columns: str) -> Rows:
    """A markdown header; the first column left-aligned, numbers right-aligned."""
    return ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main_table(results: list[dict[str, Any]], preset: Preset) -> tuple[Rows, list[dict]]:
    """Per size and method: last and best module, depth trend, last module's train accuracy."""
    rows = _head(
        "train size", "method", "epochs", "n seeds", "last-module test acc. (%)",
        "best-module test acc. (%)", "last - module K/2 (%)", "train acc., last epoch (%)",
    )  # fmt: skip
    data = []
    for size in preset.sizes:
        for method in METHODS:
            runs = ok_runs(results, phase="main", method=method, size=size)
            if not runs:
                continue
            g = group_stats(runs)
            data.append({"size": size, "method": method, **g})
            stats = (g["last"], g["best"], g["trend"], g["train"])
            cells = (size, METHOD_LABELS[method], runs[0]["epochs"], g["last"]["n"])
            rows.append(_row(*cells, *map(fmt, stats)))
    return rows, data


PAIRS = (  # (name, a, b, key): the paired differences a - b of each train size
    ("trgl_vanilla_last", "trgl", "vanilla", LAST),
    ("trgl_vanilla_best", "trgl", "vanilla", BEST),
    ("trgl_vanilla_trend", "trgl", "vanilla", TREND),
    ("trgl_e2e_last", "trgl", "e2e", LAST),
    ("vanilla_e2e_last", "vanilla", "e2e", LAST),
    ("mult_trgl_last", "multipliers", "trgl", LAST),
    ("mult_vanilla_last", "multipliers", "vanilla", LAST),
)


def paired_table(results: list[dict[str, Any]], preset: Preset) -> tuple[Rows, list[dict]]:
    """Paired (same seed: same training subset and initial weights) differences."""
    rows = _head(
        "train size", "TRGL - VanGL, last (%)", "TRGL - VanGL, best (%)",
        "TRGL - VanGL, depth trend (%)", "TRGL - E2E, last (%)", "VanGL - E2E, last (%)",
        "mult - TRGL, last (%)", "mult - VanGL, last (%)",
    )  # fmt: skip
    data = []
    for size in preset.sizes:
        runs = {m: ok_runs(results, phase="main", method=m, size=size) for m in METHODS}
        d: dict[str, Any] = {"size": size}
        for name, a, b, key in PAIRS:
            d[name] = paired_difference(runs[a], runs[b], key)
        data.append(d)
        rows.append(_row(size, *(fmt(d[name]) for name, *_ in PAIRS)))
    return rows, data


def module_table(results: list[dict[str, Any]], preset: Preset) -> tuple[Rows, list[dict]]:
    """TRGL - VanGL after each module (paired by seed), one column per train size."""
    diffs = {
        size: per_module_difference(
            ok_runs(results, phase="main", method="trgl", size=size),
            ok_runs(results, phase="main", method="vanilla", size=size),
        )
        for size in preset.sizes
    }
    rows = _head("module k", *(f"n = {size}: TRGL - VanGL (%)" for size in preset.sizes))
    for k in range(max((len(d) for d in diffs.values()), default=0)):
        rows.append(_row(k + 1, *(fmt(d[k]) if k < len(d) else "—" for d in diffs.values())))
    return rows, [{"size": size, "by_module": d} for size, d in diffs.items()]


def deep_table(results: list[dict[str, Any]], preset: Preset) -> tuple[Rows, list[dict]]:
    """The same blocks cut into K = deep_modules modules against the main runs' K = blocks."""
    rows = _head(
        "K modules", "blocks per module", "n seeds", "VanGL last (%)", "TRGL last (%)",
        "TRGL - VanGL, last (%)", "TRGL - VanGL, best (%)",
    )  # fmt: skip
    data = []
    for k, phase in ((preset.deep_modules, "deep"), (preset.blocks, "main")):
        runs = {
            m: ok_runs(results, phase=phase, method=m, size=preset.deep_size) for m in MODULEWISE
        }
        if not runs["vanilla"] or not runs["trgl"]:
            continue
        d = {
            "modules": k,
            "vanilla_last": mean_ci([r[LAST] for r in runs["vanilla"]]),
            "trgl_last": mean_ci([r[LAST] for r in runs["trgl"]]),
            "gain_last": paired_difference(runs["trgl"], runs["vanilla"], LAST),
            "gain_best": paired_difference(runs["trgl"], runs["vanilla"], BEST),
            "gain_by_seed": differences_by_seed(runs["trgl"], runs["vanilla"], LAST),
        }
        data.append(d)
        stats = (d["vanilla_last"], d["trgl_last"], d["gain_last"], d["gain_best"])
        rows.append(_row(k, preset.blocks // k, d["gain_last"]["n"], *map(fmt, stats)))
    return rows, data


def saturation_table(results: list[dict[str, Any]], preset: Preset) -> tuple[Rows, list[dict]]:
    """Was the budget enough? E2E's training accuracy at the last epoch and at 3/4 of them."""
    rows = _head(
        "train size", "epochs", "n seeds", "E2E train acc., last epoch (%)",
        "lowest seed (%)", "at 3/4 of the epochs (%)", "E2E test acc. (%)",
    )  # fmt: skip
    data = []
    for size in preset.sizes:
        runs = [
            r for r in ok_runs(results, phase="main", method="e2e", size=size) if r["train_curve"]
        ]
        if not runs:
            continue
        final = [r["train_curve"][-1] for r in runs]
        quarter = [r["train_curve"][(3 * len(r["train_curve"])) // 4 - 1] for r in runs]
        d = {"size": size, "final": mean_ci(final), "lowest": min(final)}
        d |= {"three_quarters": mean_ci(quarter), "test": mean_ci([r[LAST] for r in runs])}
        data.append(d)
        stats = (d["final"], {"mean": min(final)}, d["three_quarters"], d["test"])
        rows.append(_row(size, runs[0]["epochs"], len(runs), *map(fmt, stats)))
    return rows, data


def _setting(r: dict[str, Any]) -> str:
    if r["method"] == "trgl":
        return f"tau {r['tau']:g}"
    if r["method"] == "multipliers":
        h, every, init = r["mult"]
        return f"h {h:g}, every {every}, init {init:g}"
    return "—"


def sweep_table(results: list[dict[str, Any]], chosen_ids: list[str]) -> Rows:
    """Every sweep setting: mean validation accuracy over the sweep seeds."""
    rows = _head(
        "sweep", "method", "train size", "lr", "setting", "n seeds",
        "validation last-module acc. (%)", "validation best-module acc. (%)", "chosen",
    )  # fmt: skip
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        if r["validation"]:
            key = (r["phase"], r["method"], r["size"], r["lr"], _setting(r))
            groups.setdefault(key, []).append(r)
    for (phase, method, size, lr, setting), runs in sorted(groups.items()):
        ok = [r for r in runs if r["status"] == "ok"]
        failed = f" ({len(runs) - len(ok)} failed)" if len(ok) < len(runs) else ""
        chosen = "yes" if any(r["id"] in chosen_ids for r in runs) else ""
        scores = [fmt(mean_ci([r[key] for r in ok])) for key in (LAST, BEST)]
        n = f"{len(ok)}{failed}"
        rows.append(
            _row(phase, METHOD_LABELS[method], size, f"{lr:g}", setting, n, *scores, chosen)
        )
    return rows


def cost_table(results: list[dict[str, Any]]) -> tuple[Rows, dict[str, Any]]:
    """Measured wall time of the runs, per kind (one run = one worker for that long)."""
    rows = _head("phase", "method", "train size", "K", "runs", "seconds per run", "worker-minutes")
    groups: dict[tuple, list[float]] = {}
    for r in results:
        if r.get("seconds") is not None:
            key = (r["phase"], r["method"], r["size"], r["modules"] or "")
            groups.setdefault(key, []).append(r["seconds"])
    order = {p: i for i, p in enumerate(("lr", "tau", "mult", "main", "deep"))}
    for (phase, method, size, k), seconds in sorted(
        groups.items(), key=lambda g: (order.get(g[0][0], 9), g[0][2], METHODS.index(g[0][1]))
    ):
        mean, minutes = f"{sum(seconds) / len(seconds):.0f}", f"{sum(seconds) / 60:.1f}"
        rows.append(_row(phase, METHOD_LABELS[method], size, k, len(seconds), mean, minutes))
    total = sum(s for seconds in groups.values() for s in seconds)
    rows.append(
        _row("**all**", "", "", "", sum(map(len, groups.values())), "", f"{total / 60:.1f}")
    )
    return rows, {"worker_seconds": total}
