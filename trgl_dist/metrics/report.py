"""What people read about a run: the live progress line, report.md with plots, the results table."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trgl_dist.metrics.against_plan import plan_console_line, plan_table
from trgl_dist.metrics.records import EvalRecord, Record, TrainRecord, of_kind
from trgl_dist.metrics.timeline import plot_timeline
from trgl_dist.rundir import PLOTS_DIR, REPORT_FILE, TRACE_FILE

logger = logging.getLogger(__name__)

# More lines than this on one plot are unreadable: show evenly spaced epochs.
_MAX_EPOCH_LINES = 8


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _module_list(modules: Sequence[int]) -> str:
    """Modules 1-based for humans: [0, 1, 2] -> '1-3'."""
    if not modules:
        return "-"
    first, last = modules[0] + 1, modules[-1] + 1
    return str(first) if first == last else f"{first}-{last}"


def _new_plot(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    # Figure without pyplot: no global backend state, safe in any process or thread.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _legend_outside(ax: Any, title: str, entries: int) -> None:
    """Legend right of the axes, so it never covers a curve."""
    ax.legend(
        title=title,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        ncols=1 if entries <= 12 else 2,
        fontsize="small",
    )


def _colors(count: int) -> list[Any]:
    """Ordered colours (deep = yellow), so K=16 curves still read in module order."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(count - 1, 1) * 0.9) for i in range(count)]


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _final_eval_per_epoch(records: Sequence[Record]) -> dict[int, dict[int, float]]:
    """epoch -> module -> test accuracy (the last record wins)."""
    table: dict[int, dict[int, float]] = {}
    for rec in of_kind(records, EvalRecord):
        table.setdefault(rec.epoch, {})[rec.module] = rec.accuracy
    return table


def _plot_test_accuracy(
    records: Sequence[Record], summary: dict[str, Any], out: Path
) -> Path | None:
    per_epoch = _final_eval_per_epoch(records)
    if not per_epoch:
        return None
    fig, ax = _new_plot("Test accuracy after each module", "module", "test accuracy (%)")
    epochs = sorted(per_epoch)
    if len(epochs) == 1:
        modules = [m for m in summary["modules"] if m["test_accuracy"] is not None]
        ax.bar([m["module"] + 1 for m in modules], [100 * m["test_accuracy"] for m in modules])
    else:
        step = max(1, -(-len(epochs) // _MAX_EPOCH_LINES))
        shown = sorted(set(epochs[::-1][::step]))  # evenly spaced, always the final epoch
        for epoch, color in zip(shown, _colors(len(shown))):
            modules = sorted(per_epoch[epoch])
            accs = [100 * per_epoch[epoch][m] for m in modules]
            ax.plot([m + 1 for m in modules], accs, marker="o", color=color, label=f"{epoch + 1}")
        _legend_outside(ax, "epoch", len(shown))
    ax.set_xticks(range(1, summary["num_modules"] + 1))
    return _save(fig, out / "test_accuracy.png")


def _plot_train_curve(records: Sequence[Record], field: str, ylabel: str, out: Path) -> Path | None:
    curves: dict[int, tuple[list[float], list[float]]] = {}
    for rec in of_kind(records, TrainRecord):
        steps, values = curves.setdefault(rec.module, ([], []))
        steps.append(rec.step)
        values.append(getattr(rec, field))
    if not curves:
        return None
    fig, ax = _new_plot(f"Training {ylabel} per module", "step", ylabel)
    for module, color in zip(sorted(curves), _colors(len(curves))):
        ax.plot(*curves[module], color=color, linewidth=1.2, label=str(module + 1))
    _legend_outside(ax, "module", len(curves))
    return _save(fig, out / f"train_{field}.png")


def _stage_labels(stages: Sequence[dict[str, Any]]) -> list[str]:
    return [f"stage {s['stage']}\nmodules {_module_list(s['modules'])}" for s in stages]


def _plot_stage_time(stages: Sequence[dict[str, Any]], out: Path) -> Path | None:
    if not stages:
        return None
    fig, ax = _new_plot("Where each stage's time goes", "stage", "share of stage time (%)")
    labels, bottom = _stage_labels(stages), [0.0] * len(stages)
    parts = (("busy", "busy (compute)"), ("wait_in", "waiting for input"))
    for key, label in (*parts, ("wait_out", "waiting for output")):
        heights = [100 * s[key] for s in stages]
        ax.bar(labels, heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylim(0, 100)
    _legend_outside(ax, "time spent", 3)
    return _save(fig, out / "stage_time.png")


def _plot_stage_memory(stages: Sequence[dict[str, Any]], out: Path) -> Path | None:
    series = [
        (key, label)
        for key, label in (
            ("peak_rss_mb", "peak RSS"),
            ("peak_tensor_mb", "peak tensors"),
            ("cuda_peak_mb", "CUDA peak"),
        )
        if any(s.get(key) is not None for s in stages)
    ]
    if not stages or not series:
        return None
    fig, ax = _new_plot("Peak memory per stage", "stage", "MB")
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(stages))]
        ax.bar(xs, [s.get(key) or 0.0 for s in stages], width=width, label=label)
    ax.set_xticks(range(len(stages)), _stage_labels(stages))
    _legend_outside(ax, "memory", len(series))
    return _save(fig, out / "stage_memory.png")


def _plot_timeline(run_dir: Path, out: Path) -> Path | None:
    """A short window of the run's trace, once the pipeline has filled (with --trace)."""
    trace = run_dir / TRACE_FILE
    return plot_timeline(trace, out / "timeline.png") if trace.is_file() else None


def _last_train(records: Sequence[Record]) -> dict[int, TrainRecord]:
    return {r.module: r for r in of_kind(records, TrainRecord)}


def _module_table(records: Sequence[Record], summary: dict[str, Any]) -> list[str]:
    last = _last_train(records)
    rows = [
        "| module | stage | final test acc | best test acc | train loss | CE | transport W "
        "| tau / lambda |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in summary["modules"]:
        t = last.get(m["module"])
        if t is None:
            rows.append(f"| {m['module'] + 1} | - | {_pct(m['test_accuracy'])} "
                        f"| {_pct(m['best_test_accuracy'])} | - | - | - | - |")
            continue
        weight = t.tau if t.tau is not None else t.lambda_
        rows.append(
            f"| {m['module'] + 1} | {t.stage} | {_pct(m['test_accuracy'])} "
            f"| {_pct(m['best_test_accuracy'])} | {_num(t.loss, '.4f')} "
            f"| {_num(t.ce, '.4f')} | {_num(t.transport, '.4g')} "
            f"| {_num(weight, '.4g')} |"
        )
    return rows


def _stage_table(stages: Sequence[dict[str, Any]]) -> list[str]:
    rows = [
        "| stage | modules | busy | waiting for input | waiting for output | samples/s "
        "| peak RSS (MB) | peak tensors (MB) | CUDA peak (MB) | sent (MB) | staleness |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stages:
        sent = None if s["bytes_sent"] is None else s["bytes_sent"] / 2**20
        rows.append(
            f"| {s['stage']} | {_module_list(s['modules'])} | {_pct(s['busy'])} "
            f"| {_pct(s['wait_in'])} | {_pct(s['wait_out'])} | {_num(s['samples_per_s'])} "
            f"| {_num(s['peak_rss_mb'])} | {_num(s['peak_tensor_mb'])} "
            f"| {_num(s.get('cuda_peak_mb'))} | {_num(sent)} "
            f"| {_num(s.get('staleness_mean'), '.2f')} |"
        )
    return rows


def _headline(summary: dict[str, Any]) -> list[str]:
    best = summary.get("best_module")
    lines = [
        f"# Training report ({summary['regime']}, {summary['num_modules']} modules)",
        "",
        f"- last module's test accuracy: **{_pct(summary.get('last_module_accuracy'))}**",
        f"- best module: **{'-' if best is None else best + 1}** "
        f"({_pct(summary.get('best_module_accuracy'))})",
        f"- throughput: {_num(summary.get('samples_per_s'))} samples/s",
    ]
    times = summary.get("epoch_times") or []
    if times:
        lines.append(f"- epoch times (s): {', '.join(f'{t:.1f}' for t in times)}")
    failure = summary.get("failure")
    if failure:
        lines += ["", f"> **Run failed:** {failure.get('description', failure)}"]
    return lines


def _markdown(records: Sequence[Record], summary: dict[str, Any], plots: list[Path]) -> str:
    lines = _headline(summary)
    lines += ["", "## Per module", "", *_module_table(records, summary)]
    if summary.get("stages"):
        lines += ["", "## Per stage", "", *_stage_table(summary["stages"])]
        lines += ["", "Time shares are of busy + waiting time; memory is the per-process peak."]
    planned = plan_table(summary)
    if planned:
        lines += ["", "## Plan against measurement", "", *planned, "",
                  "Measured: each stage's mean training-step compute after warm-up, and the "
                  "tensors of its 3rd training step (MemTracker) plus the most its buffers "
                  "held; a stage's replicas are averaged (time) or the largest (memory)."]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem.replace('_', ' ')}]({PLOTS_DIR}/{p.name})\n" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, records: Sequence[Record], summary: dict[str, Any]) -> Path:
    """Write RUN_DIR/report.md and RUN_DIR/plots/*.png; plots without data are skipped."""
    run_dir = Path(run_dir)
    plots_dir = run_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    stages = summary.get("stages") or []
    made = [
        _plot_test_accuracy(records, summary, plots_dir),
        _plot_train_curve(records, "loss", "loss", plots_dir),
        _plot_train_curve(records, "transport", "transport cost W", plots_dir),
        _plot_stage_time(stages, plots_dir),
        _plot_stage_memory(stages, plots_dir),
        _plot_timeline(run_dir, plots_dir),
    ]
    plots = [p for p in made if p is not None]
    path = run_dir / REPORT_FILE
    path.write_text(_markdown(records, summary, plots), encoding="utf-8")
    logger.info("report written to %s (%d plots)", path, len(plots))
    return path


def format_console_report(summary: dict[str, Any]) -> str:
    """The plain-text results table printed at the end of a run."""
    best = summary.get("best_module")
    lines = [
        f"Results ({summary['regime']}, {summary['num_modules']} modules)",
        f"{'module':>6}  {'test acc':>9}  {'best acc':>9}",
    ]
    for m in summary["modules"]:
        mark = "  <- best" if m["module"] == best else ""
        lines.append(
            f"{m['module'] + 1:>6}  {_pct(m['test_accuracy']):>9}  "
            f"{_pct(m['best_test_accuracy']):>9}{mark}"
        )
    lines.append(
        f"last module: {_pct(summary.get('last_module_accuracy'))}   best module: "
        f"{'-' if best is None else best + 1} ({_pct(summary.get('best_module_accuracy'))})   "
        f"throughput: {_num(summary.get('samples_per_s'))} samples/s"
    )
    for s in summary.get("stages") or []:
        cuda = s.get("cuda_peak_mb")
        noun = "module" if len(s["modules"]) == 1 else "modules"
        lines.append(
            f"stage {s['stage']} ({noun} {_module_list(s['modules'])}): busy {_pct(s['busy'])}, "
            f"waiting {_pct(s['wait'])}, peak RSS {_num(s['peak_rss_mb'])} MB"
            + ("" if cuda is None else f", CUDA peak {_num(cuda)} MB")
            + plan_console_line(summary, s["stage"])
        )
    if summary.get("failure"):
        lines.append(f"FAILED: {summary['failure'].get('description', summary['failure'])}")
    return "\n".join(lines)
