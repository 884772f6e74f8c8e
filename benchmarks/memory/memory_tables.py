"""Markdown tables from the memory results JSON (every number comes from that file)."""

from __future__ import annotations

from typing import Any

BREAKDOWN = ("params", "grads", "optimizer", "activations", "temp", "bn_buffers", "batch_buffers")


def saving(peak: float, e2e: float) -> str:
    return f"{100 * (1 - peak / e2e):.1f}"


def worst_stage(config: dict[str, Any], phase: str) -> tuple[int, float]:
    """(stage index, peak MiB) of the stage with the largest ``phase`` peak."""
    best = max(config["stages"], key=lambda s: s[phase]["total"])
    return best["stage"], best[phase]["total"]


def summary_table(results: dict[str, Any]) -> str:
    """One row per K, split and method: lock-step and worst-stage peaks against E2E."""
    head = (
        "| K | split | method | blocks per module | E2E MiB | lock-step MiB | saving % "
        "| worst stage (train) MiB | saving % | worst stage (incl. test pass) MiB | saving % |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for c in results["configs"]:
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
        if "stages" in c:
            stage, train = worst_stage(c, "train")
            worst_index, worst = worst_stage(c, "worst")
            row += [f"{train:.0f} (stage {stage + 1})", saving(train, e2e)]
            row += [f"{worst:.0f} (stage {worst_index + 1})", saving(worst, e2e)]
        else:
            row += ["-"] * 4
        rows.append("| " + " | ".join(row) + " |")
    return head + "\n".join(rows) + "\n"


def breakdown_row(name: str, peak: dict[str, float], e2e: float) -> str:
    cells = [name, *(f"{peak[key]:.1f}" for key in BREAKDOWN), f"{peak['total']:.1f}"]
    return "| " + " | ".join(cells) + f" | {saving(peak['total'], e2e)} |"


def breakdown_table(results: dict[str, Any], config: dict[str, Any]) -> str:
    """Categories at the moment of the peak: E2E, the lock-step step, each stage (train)."""
    e2e = results["e2e"][str(config["modules"])]
    head = (
        f"K = {config['modules']}, {config['split']}, {config['method']} "
        f"(blocks {'/'.join(map(str, config['counts']))}), MiB at the peak:\n\n"
        "| run | "
        + " | ".join(BREAKDOWN)
        + " | total | saving % |\n"
        + "|---" * (len(BREAKDOWN) + 3)
        + "|\n"
    )
    rows = [breakdown_row("E2E", e2e, e2e["total"])]
    rows.append(breakdown_row("lock-step", config["lockstep"], e2e["total"]))
    for stage in config.get("stages", []):
        rows.append(breakdown_row(f"stage {stage['stage'] + 1}", stage["train"], e2e["total"]))
    return head + "\n".join(rows) + "\n"


def estimator_table(check: dict[str, Any]) -> str:
    """Real peak RSS growth of a small CPU run against the MemTracker estimate."""
    head = (
        "| allocator | regime | batch | real RSS growth MiB | MemTracker estimate MiB "
        "| difference MiB | difference % of real |\n|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for row in check["rows"]:
        diff = row["growth_mib"] - row["estimate_mib"]
        rows.append(
            f"| {row['allocator']} | {row['regime']} | {row['batch_size']} "
            f"| {row['growth_mib']:.0f} "
            f"| {row['estimate_mib']:.0f} | {diff:+.0f} | {100 * diff / row['growth_mib']:+.1f} |"
        )
    text = head + "\n".join(rows) + "\n"
    for regime, slope in check.get("slopes", {}).items():
        text += (
            f"\n{regime}: per extra sample, real {slope['real_mib']:.2f} MiB vs estimate "
            f"{slope['estimate_mib']:.2f} MiB"
        )
    return text + ("\n" if check.get("slopes") else "")


def environment_lines(env: dict[str, Any]) -> str:
    """Machine, versions and the exact command, from the results file."""
    return (
        f"Machine: {env['cpu_model']}, {env['cpus']} CPUs, {env.get('memory_gib', '?')} GiB, "
        f"{env['platform']}, {env['libc']}. Python {env['python']}, torch {env['torch']}, "
        f"torchvision {env['torchvision']}. Command: `{env['command']}`\n"
    )


def cuda_table(results: dict[str, Any]) -> str:
    """Where a GPU was present: the allocator's real peaks (totals only)."""
    head = (
        "| K | split | method | E2E MiB | lock-step MiB | saving % | worst stage MiB | saving % |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for c in results["configs"]:
        if "cuda" not in c:
            continue
        g = c["cuda"]
        worst = max(g["stages"])
        rows.append(
            f"| {c['modules']} | {c['split']} | {c['method']} | {g['e2e']:.0f} "
            f"| {g['lockstep']:.0f} | {saving(g['lockstep'], g['e2e'])} "
            f"| {worst:.0f} | {saving(worst, g['e2e'])} |"
        )
    return head + "\n".join(rows) + "\n"


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
