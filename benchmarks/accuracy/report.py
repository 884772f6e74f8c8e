"""From the run records to results.json, the markdown tables and the per-module plot."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from benchenv import splice_readme  # noqa: E402
from experiments import METHOD_LABELS, MODULEWISE, Preset, size_label  # noqa: E402
from stats import (  # noqa: E402
    differences_by_seed,
    fmt,
    group_stats,
    ok_runs,
    paired_difference,
    per_module,
)
from verdicts import verdict_lines  # noqa: E402

PLOT_FILE = "accuracy_by_module.png"
PARTIAL = " — PARTIAL: not every planned run finished"
#: A table row from a group's filter, its runs and their group_stats.
GroupRow = Callable[[dict[str, Any], list[dict[str, Any]], dict[str, Any]], str]
MAIN_HEAD = [
    "| train size | method | regime | n seeds | last-module acc. (%) | best-module acc. (%) "
    "| best - last (%) |",
    "|---:|---|---|---:|---:|---:|---:|",
]
REGIME_HEAD = [
    "| regime | method | train size | epochs per module | n seeds | last-module acc. (%) "
    "| best-module acc. (%) |",
    "|---|---|---:|---:|---:|---:|---:|",
]


def group_table(
    results: list[dict[str, Any]], head: list[str], groups: Iterable[dict[str, Any]], row: GroupRow
) -> tuple[list[str], list[dict[str, Any]]]:
    """``head``, then a row per group (a filter of ``ok_runs``: phase and more) with
    finished runs; and each such group's stats, keyed by its filter without the phase."""
    rows, data = list(head), []
    for match in groups:
        runs = ok_runs(results, **match)
        if not runs:
            continue
        g = group_stats(runs)
        data.append({**{k: v for k, v in match.items() if k != "phase"}, **g})
        rows.append(row(match, runs, g))
    return rows, data


def main_table(results: list[dict[str, Any]], sizes: list[int]) -> tuple[list[str], list[dict]]:
    """Per train size and method (main runs): last and best module, and the drop."""
    return group_table(
        results,
        MAIN_HEAD,
        (
            {"phase": "main", "size": size, "method": method}
            for size in sizes
            for method in (*MODULEWISE, "e2e")
        ),
        lambda match, runs, g: (
            f"| {size_label(match['size'])} | {METHOD_LABELS[match['method']]} "
            f"| {runs[0]['regime']} "
            f"| {g['last']['n']} | {fmt(g['last'])} | {fmt(g['best'])} | {fmt(g['drop'])} |"
        ),
    )


def comparison_table(results: list[dict[str, Any]], sizes: list[int]) -> tuple[list[str], list]:
    """Paired (same seed) differences: TRGL - VanGL and TRGL - E2E, last and best module."""
    rows = [
        "| train size | TRGL - VanGL, last (%) | TRGL - VanGL, best (%) | TRGL - E2E, last (%) "
        "| VanGL - E2E, last (%) |",
        "|---:|---:|---:|---:|---:|",
    ]
    data = []
    for size in sizes:
        methods = (*MODULEWISE, "e2e")
        runs = {m: ok_runs(results, phase="main", method=m, size=size) for m in methods}
        key = "last_module_accuracy"
        d = {
            "size": size,
            "trgl_vs_vanilla_last": paired_difference(runs["trgl"], runs["vanilla"], key),
            "trgl_vs_vanilla_best": paired_difference(
                runs["trgl"], runs["vanilla"], "best_module_accuracy"
            ),
            "trgl_vs_e2e_last": paired_difference(runs["trgl"], runs["e2e"], key),
            "vanilla_vs_e2e_last": paired_difference(runs["vanilla"], runs["e2e"], key),
        }
        data.append(d)
        rows.append(
            f"| {size_label(size)} | {fmt(d['trgl_vs_vanilla_last'])} "
            f"| {fmt(d['trgl_vs_vanilla_best'])} | {fmt(d['trgl_vs_e2e_last'])} "
            f"| {fmt(d['vanilla_vs_e2e_last'])} |"
        )
    return rows, data


def regime_table(results: list[dict[str, Any]]) -> tuple[list[str], list[dict]]:
    """Per regime (sequential, multilap) and module-wise method: last and best module."""
    return group_table(
        results,
        REGIME_HEAD,
        (
            {"phase": "regimes", "regime": regime, "method": method}
            for regime in ("sequential", "multilap")
            for method in MODULEWISE
        ),
        lambda match, runs, g: (
            f"| {match['regime']} | {METHOD_LABELS[match['method']]} | {runs[0]['size']} "
            f"| {runs[0]['epochs']} | {g['last']['n']} | {fmt(g['last'])} | {fmt(g['best'])} |"
        ),
    )


def modules_table(
    results: list[dict[str, Any]], preset: Preset
) -> tuple[list[str], list[dict[str, Any]]]:
    """The same network cut into K modules: VanGL, TRGL and the paired TRGL - VanGL gain,
    at the smallest train size. The main runs give the preset's K."""
    rows = [
        "| K modules | blocks per module | n seeds | VanGL last (%) | TRGL last (%) "
        "| TRGL - VanGL, last (%) | TRGL - VanGL, best (%) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    data = []
    size = preset.sweep_size
    for k in sorted({preset.modules, *preset.fewer_modules}):
        phase, spec_k = ("main", 0) if k == preset.modules else ("modules", k)
        runs = {
            m: ok_runs(results, phase=phase, method=m, size=size, modules=spec_k)
            for m in MODULEWISE
        }
        if not runs["vanilla"] or not runs["trgl"]:
            continue
        d = {
            "modules": k,
            "blocks_per_module": preset.blocks // k,
            "vanilla_last": group_stats(runs["vanilla"])["last"],
            "trgl_last": group_stats(runs["trgl"])["last"],
            "gain_last": paired_difference(runs["trgl"], runs["vanilla"], "last_module_accuracy"),
            "gain_best": paired_difference(runs["trgl"], runs["vanilla"], "best_module_accuracy"),
            "gain_by_seed": differences_by_seed(
                runs["trgl"], runs["vanilla"], "last_module_accuracy"
            ),
        }
        data.append(d)
        rows.append(
            f"| {k} | {d['blocks_per_module']} | {d['gain_last']['n']} | {fmt(d['vanilla_last'])} "
            f"| {fmt(d['trgl_last'])} | {fmt(d['gain_last'])} | {fmt(d['gain_best'])} |"
        )
    return rows, data


def sweep_table(results: list[dict[str, Any]], choice: dict[str, Any]) -> list[str]:
    rows = [
        "| method | lr | tau | validation last-module acc. (%) | validation best-module acc. (%) "
        "| chosen |",
        "|---|---:|---:|---:|---:|---|",
    ]
    chosen = set(choice.get("chosen_ids", []))
    sweep = sorted(ok_runs(results, phase="sweep"), key=lambda r: (r["method"], r["lr"], r["tau"]))
    for r in sweep:
        tau = f"{r['tau']:g}" if r["method"] == "trgl" else "—"
        rows.append(
            f"| {METHOD_LABELS[r['method']]} | {r['lr']:g} | {tau} "
            f"| {100 * r['last_module_accuracy']:.2f} | {100 * r['best_module_accuracy']:.2f} "
            f"| {'yes' if r['id'] in chosen else ''} |"
        )
    return rows


def pipeline_table(results: list[dict[str, Any]], epochs: int) -> tuple[list[str], dict[str, Any]]:
    runs = {r["regime"]: r for r in ok_runs(results, phase="pipeline", epochs=epochs)}
    rows = [
        "| regime | last-module acc. (%) | best-module acc. (%) | accuracy after each module (%) |",
        "|---|---:|---:|---|",
    ]
    for regime in ("parallel", "pipeline"):
        if regime in runs:
            r = runs[regime]
            each = " ".join(f"{100 * a:.2f}" for a in r["module_accuracy"])
            rows.append(
                f"| {regime} | {100 * r['last_module_accuracy']:.2f} "
                f"| {100 * r['best_module_accuracy']:.2f} | {each} |"
            )
    data: dict[str, Any] = {"max_abs_difference": None}
    if runs:
        r = next(iter(runs.values()))
        rows[:0] = [
            f"TRGL, train size {r['size']}, seed {r['seed']}, {r['epochs']} epochs, lr {r['lr']:g},"
            f" tau {r['tau']:g}, test set scored after every epoch; pipeline = torchrun, 2 ranks.",
            "",
        ]
    if len(runs) == 2:
        pairs = zip(
            runs["parallel"]["module_accuracy"], runs["pipeline"]["module_accuracy"], strict=True
        )
        data["max_abs_difference"] = max(abs(a - b) for a, b in pairs)
        rows.append("")
        rows.append(
            f"Largest difference over the modules: {100 * data['max_abs_difference']:.4f} "
            "percentage points."
        )
    return rows, data


def plot_by_module(results: list[dict[str, Any]], size: int, path: Path) -> bool:
    """Mean test accuracy after each module (95% CI band) for VanGL and TRGL, E2E as a line."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for method, color in (("vanilla", "tab:orange"), ("trgl", "tab:blue")):
        stats = per_module(ok_runs(results, phase="main", method=method, size=size))
        if not stats:
            continue
        k = list(range(1, len(stats) + 1))
        mean = [100 * s["mean"] for s in stats]
        half = [100 * (s["ci95"] or 0.0) for s in stats]
        label = f"{METHOD_LABELS[method]} (n={stats[0]['n']} seeds)"
        ax.plot(k, mean, marker="o", ms=3, color=color, label=label)
        ax.fill_between(
            k,
            [m - h for m, h in zip(mean, half, strict=True)],
            [m + h for m, h in zip(mean, half, strict=True)],
            color=color,
            alpha=0.2,
        )
        drawn = True
    e2e = group_stats(ok_runs(results, phase="main", method="e2e", size=size)) if drawn else None
    if e2e and e2e["last"]["n"]:
        ax.axhline(100 * e2e["last"]["mean"], color="black", ls="--", label="E2E (whole network)")
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("module k (the network cut after module k, scored with head F_k)")
    ax.set_ylabel("test accuracy (%): mean, 95% CI band")
    ax.set_title(f"Fashion-MNIST, train size {size_label(size)}: accuracy after each module")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(
    out: Path,
    preset: Preset,
    results: list[dict[str, Any]],
    choice: dict[str, Any],
    command: str,
    partial: bool,
) -> dict[str, Any]:
    """Write results.json, table.md and the plot; return the aggregate."""
    sizes = [s for s in (*preset.sizes, 0) if ok_runs(results, phase="main", size=s)]
    main_rows, main_data = main_table(results, sizes)
    cmp_rows, cmp_data = comparison_table(results, sizes)
    reg_rows, reg_data = regime_table(results)
    pipe_rows, pipe_data = pipeline_table(results, preset.pipeline_epochs)
    mod_rows, mod_data = modules_table(results, preset)
    plotted = plot_by_module(results, preset.sizes[0], out / PLOT_FILE)
    aggregate = {
        "preset": preset.name,
        "command": command,
        "partial": partial,
        "choice": choice,
        "main": main_data,
        "paired_differences": cmp_data,
        "regimes": reg_data,
        "module_counts": mod_data,
        "pipeline_check": pipe_data,
        "plot": PLOT_FILE if plotted else None,
        "runs": len(results),
        "failed_runs": [r["id"] for r in results if r["status"] != "ok"],
    }
    (out / "results.json").write_text(json.dumps(aggregate, indent=2) + "\n")
    lines = [
        f"<!-- generated by: {command} -->",
        f"**Preset `{preset.name}`{PARTIAL if partial else ''}.**"
        " Accuracies in %, mean ± 95% t-interval half-width over seeds (no interval: one seed).",
        "",
        "### Test accuracy by method and train size (parallel regime for VanGL/TRGL)",
        "",
        *main_rows,
        "",
        "### Paired differences (same seed = same data subset and init)",
        "",
        *cmp_rows,
        "",
        f"### Many modules or few: the same network cut into K modules, train size "
        f"{preset.sweep_size}",
        "",
        *mod_rows,
        "",
        "### Sequential and multi-lap regimes",
        "",
        *reg_rows,
        "",
        "### Pipeline (torchrun) against parallel, same seed",
        "",
        *pipe_rows,
        "",
        "### Hyper-parameter sweep (validation split carved from the training set)",
        "",
        *sweep_table(results, choice),
        "",
        "### What the numbers say",
        "",
        *verdict_lines(aggregate),
        "",
    ]
    (out / "table.md").write_text("\n".join(lines))
    return aggregate


BEGIN, END = "<!-- results:begin (generated from table.md) -->", "<!-- results:end -->"


def embed_in_readme(readme: Path, table: Path) -> bool:
    """Replace the README's block between the result markers by table.md, verbatim."""
    return splice_readme(readme, table.read_text(), BEGIN, END)
