"""The paper's claims judged from 95% intervals: confirmed, contradicted or not confirmed."""

from __future__ import annotations

from typing import Any

from experiments import Preset
from stats import excludes_zero, fmt, mean_ci, welch_difference


def verdict(stat: dict[str, Any] | None, sign: int = 1) -> str:
    """The word for a claim that the quantity is above 0 (sign 1) or below it (sign -1)."""
    side = excludes_zero(stat) if stat else None
    if side is None:
        return "no interval yet (fewer than 2 seeds)"
    if not side:
        return "not confirmed"
    return "confirmed" if stat["mean"] * sign > 0 else "contradicted"


def _line(claim: str, stat: dict[str, Any] | None, sign: int = 1, extra: str = "") -> str:
    n = f", n = {stat['n']}" if stat and stat.get("n") else ""
    return f"- {claim}: **{verdict(stat, sign)}** ({fmt(stat)} points{n}){extra}."


def _by_size(aggregate: dict[str, Any], key: str) -> dict[int, dict[str, Any]]:
    return {d["size"]: d[key] for d in aggregate["paired_differences"]}


def _scarcity(aggregate: dict[str, Any], preset: Preset) -> str:
    """Gain at the smallest size minus gain at the largest (independent subsets: Welch)."""
    gains = _by_size(aggregate, "trgl_vanilla_last")
    small, large = preset.sizes[0], preset.sizes[-1]
    stat = welch_difference(gains[small]["values"], gains[large]["values"])
    listed = ", ".join(f"{s}: {fmt(g)}" for s, g in gains.items())
    return _line(
        f"TRGL's gain over VanGL is larger at {small} images than at {large}",
        stat,
        extra=f"; gain by size: {listed}",
    )


def _modules(aggregate: dict[str, Any]) -> str:
    """Gain with K = blocks minus gain with fewer modules, paired by seed (same subsets)."""
    rows = aggregate["module_counts"]
    if len(rows) < 2:
        return "- More modules, more gain: **not run yet**."
    few, many = rows[0], rows[-1]
    shared = sorted(set(few["gain_by_seed"]) & set(many["gain_by_seed"]))
    stat = mean_ci([many["gain_by_seed"][s] - few["gain_by_seed"][s] for s in shared])
    return _line(
        f"TRGL's gain over VanGL is larger with K = {many['modules']} modules than with"
        f" K = {few['modules']} (gain K = {many['modules']} minus gain K = {few['modules']})",
        stat,
        extra=f"; gains: K = {many['modules']} {fmt(many['gain_last'])}, K = {few['modules']}"
        f" {fmt(few['gain_last'])}",
    )


def _depth(aggregate: dict[str, Any], preset: Preset) -> list[str]:
    trend = {(d["size"], d["method"]): d["trend"] for d in aggregate["main"]}
    lines = []
    for size, stat in _by_size(aggregate, "trgl_vanilla_trend").items():
        lines.append(
            _line(
                f"n = {size}: VanGL's accuracy falls from module {preset.blocks // 2} to"
                f" {preset.blocks}",
                trend.get((size, "vanilla")),
                sign=-1,
            )
        )
        lines.append(_line(f"n = {size}: TRGL's falls less (TRGL - VanGL of that change)", stat))
    return lines


def verdict_lines(aggregate: dict[str, Any], preset: Preset) -> list[str]:
    """Every claim, one line each, from the aggregate of write_report."""
    lines = ["TRGL against VanGL, last module (the network's output):"]
    for size, stat in _by_size(aggregate, "trgl_vanilla_last").items():
        lines.append(_line(f"n = {size}: TRGL above VanGL", stat))
    lines += ["", "Stagnation or collapse with depth, and whether TRGL stops it:"]
    lines += _depth(aggregate, preset)
    lines += ["", "Where TRGL helps most:", _scarcity(aggregate, preset), _modules(aggregate)]
    lines += ["", "Module-wise training against end-to-end back-propagation (same epochs):"]
    for size, stat in _by_size(aggregate, "trgl_e2e_last").items():
        lines.append(_line(f"n = {size}: TRGL above E2E", stat))
    lines += ["", "The method of multipliers:"]
    for size, stat in _by_size(aggregate, "mult_trgl_last").items():
        if size in preset.mult_sizes:
            lines.append(_line(f"n = {size}: TRGL-mult above TRGL", stat))
            lines.append(
                _line(
                    f"n = {size}: TRGL-mult above VanGL",
                    _by_size(aggregate, "mult_vanilla_last")[size],
                )
            )
    return lines
