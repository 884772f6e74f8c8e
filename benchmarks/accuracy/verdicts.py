"""Plain statements, generated from the aggregate, on each of the paper's claims tested here."""

from __future__ import annotations

from typing import Any

from experiments import size_label
from stats import excludes_zero, fmt, mean_ci


def _sign_word(stat: dict[str, Any], above: str, below: str, unresolved: str) -> str:
    side = excludes_zero(stat)
    if side is None:
        return "no interval (fewer than 2 paired seeds)"
    if not side:
        return unresolved
    return above if stat["mean"] > 0 else below


def _collapse_lines(aggregate: dict[str, Any]) -> list[str]:
    lines = []
    for d in aggregate["paired_differences"]:
        stat = d["trgl_vs_vanilla_last"]
        word = _sign_word(
            stat,
            "TRGL better (interval above 0)",
            "TRGL worse (interval below 0)",
            "no significant difference (interval contains 0)",
        )
        drops = {m["method"]: m["drop"] for m in aggregate["main"] if m["size"] == d["size"]}
        lines.append(
            f"- Train size {size_label(d['size'])}: last-module accuracy TRGL - VanGL = "
            f"{fmt(stat)} points: **{word}**. Drop from the best module to the last: "
            f"VanGL {fmt(drops.get('vanilla'))}, TRGL {fmt(drops.get('trgl'))} points."
        )
    return lines


def _scarcity_line(aggregate: dict[str, Any]) -> str:
    gains = [
        (d["size"], d["trgl_vs_vanilla_last"]["mean"])
        for d in aggregate["paired_differences"]
        if d["trgl_vs_vanilla_last"]["mean"] is not None and d["size"] != 0
    ]
    if len(gains) < 2:
        return "- Scarce data: not enough train sizes finished to compare."
    smallest = min(gains)[0]
    largest_gain = max(gains, key=lambda g: g[1])
    holds = largest_gain[0] == smallest and largest_gain[1] > 0
    listed = ", ".join(f"{s}: {100 * g:+.2f}" for s, g in sorted(gains))
    return (
        f"- Gain largest at the smallest train size? **{'yes' if holds else 'no'}** "
        f"(mean TRGL - VanGL last-module gain by size, points: {listed}; the intervals above "
        "say which gains are distinguishable from 0)."
    )


def _modules_line(aggregate: dict[str, Any]) -> str:
    """Is TRGL's gain over VanGL larger with more modules? The gain difference is paired by
    seed (same training subset at every K)."""
    rows = aggregate["module_counts"]
    if len(rows) < 2:
        return "- Many modules: not enough module counts finished to compare."
    few, many = rows[0], rows[-1]
    shared = sorted(set(few["gain_by_seed"]) & set(many["gain_by_seed"]))
    diff = mean_ci([many["gain_by_seed"][s] - few["gain_by_seed"][s] for s in shared])
    word = _sign_word(
        diff,
        "yes (interval above 0)",
        "no, smaller (interval below 0)",
        "no significant difference (interval contains 0)",
    )
    return (
        f"- Gain larger with more modules? TRGL - VanGL last-module gain at K = "
        f"{many['modules']}: {fmt(many['gain_last'])}, at K = {few['modules']}: "
        f"{fmt(few['gain_last'])} points; difference of the gains, paired by seed: "
        f"{fmt(diff)}: **{word}**."
    )


def _e2e_lines(aggregate: dict[str, Any]) -> list[str]:
    lines = []
    for d in aggregate["paired_differences"]:
        stat = d["trgl_vs_e2e_last"]
        word = _sign_word(
            stat, "TRGL above E2E", "TRGL below E2E", "indistinguishable from E2E at this n"
        )
        lines.append(
            f"- Train size {size_label(d['size'])}: TRGL - E2E = {fmt(stat)} points: **{word}**; "
            f"VanGL - E2E = {fmt(d['vanilla_vs_e2e_last'])}."
        )
    return lines


def _pipeline_line(aggregate: dict[str, Any]) -> str:
    diff = aggregate["pipeline_check"].get("max_abs_difference")
    if diff is None:
        return "- Pipeline vs parallel: not run (or a run failed)."
    same = "identical" if diff == 0 else f"differ by up to {100 * diff:.4f} points"
    return f"- Pipeline (torchrun) vs parallel, same seed: per-module test accuracies **{same}**."


def verdict_lines(aggregate: dict[str, Any]) -> list[str]:
    return [
        "Transport regularization vs stagnation/collapse of deep module-wise training:",
        *_collapse_lines(aggregate),
        _scarcity_line(aggregate),
        _modules_line(aggregate),
        "Module-wise training competitive with E2E (same epochs):",
        *_e2e_lines(aggregate),
        _pipeline_line(aggregate),
    ]
