"""Markdown tables from the memory results JSON (every number comes from that file)."""

from __future__ import annotations

from typing import Any

from benchenv import environment_lines, markdown_table

BREAKDOWN = ("params", "grads", "optimizer", "activations", "temp", "bn_buffers", "batch_buffers")


def saving(peak: float, e2e: float) -> str:
    return f"{100 * (1 - peak / e2e):.1f}"


def worst_stage(config: dict[str, Any], phase: str) -> tuple[int, float]:
    """(stage index, peak MiB) of the stage with the largest ``phase`` peak."""
    best = max(config["stages"], key=lambda s: s[phase]["total"])
    return best["stage"], best[phase]["total"]


def summary_table(results: dict[str, Any]) -> str:
    """One row per K, split and method: lock-step and worst-stage peaks against E2E."""
    header = (
        "K | split | method | blocks per module | E2E MiB | lock-step MiB | saving % "
        "| worst stage (train) MiB | saving % | worst stage (incl. test pass) MiB | saving %"
    )
    return markdown_table(header, [summary_row(results, c) for c in results["configs"]])


def summary_row(results: dict[str, Any], c: dict[str, Any]) -> list[str]:
    e2e = results["e2e"][str(c["modules"])]["total"]
    lock = c["lockstep"]["total"]
    row = [
        str(c["modules"]),
        c["split"],
        c["method"],
        "/".join(map(str, c["counts"])),
        f"{e2e:.0f}",
        f"{lock:.0f}",
        saving(lock, e2e),
    ]
    if "stages" not in c:
        return [*row, "-", "-", "-", "-"]
    stage, train = worst_stage(c, "train")
    worst_index, worst = worst_stage(c, "worst")
    row += [f"{train:.0f} (stage {stage + 1})", saving(train, e2e)]
    return [*row, f"{worst:.0f} (stage {worst_index + 1})", saving(worst, e2e)]


def breakdown_row(name: str, peak: dict[str, float], e2e: float) -> list[str]:
    cells = [f"{peak[key]:.1f}" for key in BREAKDOWN]
    return [name, *cells, f"{peak['total']:.1f}", saving(peak["total"], e2e)]


def breakdown_table(results: dict[str, Any], config: dict[str, Any]) -> str:
    """Categories at the moment of the peak: E2E, the lock-step step, each stage (train)."""
    e2e = results["e2e"][str(config["modules"])]
    head = (
        f"K = {config['modules']}, {config['split']}, {config['method']} "
        f"(blocks {'/'.join(map(str, config['counts']))}), MiB at the peak:\n\n"
    )
    rows = [breakdown_row("E2E", e2e, e2e["total"])]
    rows.append(breakdown_row("lock-step", config["lockstep"], e2e["total"]))
    for stage in config.get("stages", []):
        rows.append(breakdown_row(f"stage {stage['stage'] + 1}", stage["train"], e2e["total"]))
    return head + markdown_table(" | ".join(("run", *BREAKDOWN, "total", "saving %")), rows)


def estimator_table(check: dict[str, Any]) -> str:
    """Real peak RSS growth of a small CPU run against the MemTracker estimate."""
    header = (
        "allocator | regime | batch | real RSS growth MiB | MemTracker estimate MiB "
        "| difference MiB | difference % of real"
    )
    text = markdown_table(header, [estimator_row(row) for row in check["rows"]])
    for regime, slope in check.get("slopes", {}).items():
        text += (
            f"\n{regime}: per extra sample, real {slope['real_mib']:.2f} MiB vs estimate "
            f"{slope['estimate_mib']:.2f} MiB"
        )
    return text + ("\n" if check.get("slopes") else "")


def estimator_row(row: dict[str, Any]) -> list[str]:
    diff = row["growth_mib"] - row["estimate_mib"]
    return [
        row["allocator"],
        row["regime"],
        str(row["batch_size"]),
        f"{row['growth_mib']:.0f}",
        f"{row['estimate_mib']:.0f}",
        f"{diff:+.0f}",
        f"{100 * diff / row['growth_mib']:+.1f}",
    ]


def cuda_table(results: dict[str, Any]) -> str:
    """Where a GPU was present: the allocator's real peaks (totals only)."""
    header = "K | split | method | E2E MiB | lock-step MiB | saving % | worst stage MiB | saving %"
    rows = []
    for c in results["configs"]:
        if "cuda" not in c:
            continue
        g = c["cuda"]
        worst = max(g["stages"])
        rows.append(
            [
                str(c["modules"]),
                c["split"],
                c["method"],
                f"{g['e2e']:.0f}",
                f"{g['lockstep']:.0f}",
                saving(g["lockstep"], g["e2e"]),
                f"{worst:.0f}",
                saving(worst, g["e2e"]),
            ]
        )
    return markdown_table(header, rows)


def report(results: dict[str, Any]) -> str:
    """The whole markdown report: summary, per-category breakdowns, estimator check."""
    s = results["setting"]
    parts = [
        f"Model {s['model']} at {s['channels']}x{s['size']}x{s['size']}, batch {s['batch_size']}, "
        f"buffer size {s['buffer_size']}, one module per stage (W = K).\n",
        "### Peak memory per device against E2E\n",
        summary_table(results),
        "### Breakdown at the peak\n",
    ]
    for config in results["configs"]:
        if config.get("breakdown"):
            parts.append(breakdown_table(results, config))
    if any("cuda" in c for c in results["configs"]):
        parts += ["### GPU: torch.cuda.max_memory_allocated\n", cuda_table(results)]
    if "estimator" in results:
        e = results["estimator"]["setting"]
        parts.append(
            f"### Estimator check: real CPU run ({e['model']} at "
            f"{e['channels']}x{e['size']}x{e['size']}, K = {results['estimator']['modules']}, "
            "1 thread)\n"
        )
        parts.append(estimator_table(results["estimator"]))
    if "cpu_model" in results["environment"]:
        parts.append(environment_lines(results["environment"]))
    return "\n".join(parts)
