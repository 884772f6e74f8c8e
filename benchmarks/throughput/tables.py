"""The benchmark's markdown tables and machine/library description, from its result JSON."""

from __future__ import annotations

import os
import platform
from typing import Any

EFFICIENCY_TARGET = 0.9
SPEEDUP_TARGET = 1.3  # c/d at K=2
# Per preset, judged at K=2: in-run / co-run per stage (on these splits), efficiency against
# the co-run bound, and c/a on the equal-time split (None: not judged for that preset).
TARGETS: dict[str, dict[str, Any]] = {
    "full": {"inrun_over_corun": 1.05, "ratio_splits": ("equal-depth", "equal-time"),
             "efficiency_corun": 0.97, "c_over_a": None},
    "quick": {"inrun_over_corun": 1.10, "ratio_splits": ("equal-time",),
              "efficiency_corun": None, "c_over_a": 1.0},
}  # fmt: skip
TARGETS["tiny"] = TARGETS["quick"]


def environment_info(command: str) -> dict[str, Any]:
    import numpy
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "command": command,
    }


def load_line(load: dict[str, float] | None) -> str:
    """One sentence on the machine's other work during the run, for a table's header."""
    if not load:
        return ""
    return (
        f" Other processes used {load['other_cpu_s']:.0f} CPU s during the "
        f"{load['seconds']:.0f} s run ({100 * load['other_share']:.0f}% of the cores; "
        f"hypervisor steal {load['steal_s']:.0f} s): the larger, the less these numbers "
        "say about the runtime."
    )


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def throughput_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    a = result["e2e_best"]["samples_per_s"]
    for e2e in result["e2e"]:
        rows.append(["all", f"(a) E2E, 1 process, {e2e['threads']} thread(s)", "-",
                     _f(e2e["samples_per_s"]), _f(e2e["samples_per_s"] / a, 2)])  # fmt: skip
    for k, per_k in result["per_k"].items():
        for par in per_k["parallel"]:
            rows.append([k, f"(b) parallel, 1 process, {par['threads']} thread(s)", "-",
                         _f(par["samples_per_s"]), _f(par["samples_per_s"] / a, 2)])  # fmt: skip
        for split, c in per_k["splits"].items():
            rows.append([k, f"(c) our pipeline, {k} processes", f"{split} {c['blocks_per_module']}",
                         _f(c["samples_per_s"]), _f(c["samples_per_s"] / a, 2)])  # fmt: skip
        for d in per_k["pipelining"]:
            name = "ScheduleGPipe" if d["schedule"] == "gpipe" else "Schedule1F1B"
            rows.append([k, f"(d) {name}, {d['microbatches']} micro-batches", "equal-depth",
                         _f(d["samples_per_s"]), _f(d["samples_per_s"] / a, 2)])  # fmt: skip
    return rows


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _targets(result: dict[str, Any]) -> dict[str, Any]:
    return TARGETS.get(result.get("preset", "full"), TARGETS["full"])


def _ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def efficiency_header(result: dict[str, Any]) -> list[str]:
    t = _targets(result)
    header = ["K", "split", "blocks/module", "(c) samples/s", "slowest alone bound",
              "efficiency", "slowest co-run bound", "efficiency (co-run)", "2-core bound", "c/a",
              "c/d", f"K=2: efficiency >= {EFFICIENCY_TARGET}",
              f"K=2: c/d >= {SPEEDUP_TARGET}"]  # fmt: skip
    if t["efficiency_corun"] is not None:
        header.append(f"K=2: efficiency (co-run) >= {t['efficiency_corun']}")
    if t["c_over_a"] is not None:
        header.append(f"K=2 equal-time: c/a >= {t['c_over_a']}")
    return header


def pipeline_rows(result: dict[str, Any]) -> list[list[Any]]:
    t = _targets(result)
    rows = []
    for k, per_k in result["per_k"].items():
        for split, c in per_k["splits"].items():
            judged = k == "2"
            verdicts = [
                _verdict(c["efficiency"] >= EFFICIENCY_TARGET) if judged else "",
                _verdict(c["c_over_d"] >= SPEEDUP_TARGET) if judged else "",
            ]
            eff_corun = c.get("efficiency_corun")
            if t["efficiency_corun"] is not None:
                ok = judged and eff_corun is not None
                verdicts.append(_verdict(eff_corun >= t["efficiency_corun"]) if ok else "")
            if t["c_over_a"] is not None:
                ok = judged and split == "equal-time"
                verdicts.append(_verdict(c["c_over_a"] >= t["c_over_a"]) if ok else "")
            rows.append([k, split, c["blocks_per_module"], _f(c["samples_per_s"]),
                         _f(c["bound_samples_per_s"]), _f(c["efficiency"], 2),
                         _f(c.get("corun_bound_samples_per_s")),
                         _paired(c.get("efficiency_corun_spread"), eff_corun, 2),
                         _f(c["cpu_bound_samples_per_s"]), _f(c["c_over_a"], 2),
                         _f(c["c_over_d"], 2), *verdicts])  # fmt: skip
    return rows


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def _spread(summary: dict[str, Any] | None) -> str:
    """Median [min-max] over the repeats, in ms."""
    if not summary:
        return "-"
    return f"{_ms(summary['median_s'])} [{_ms(summary['min_s'])}-{_ms(summary['max_s'])}]"


def _paired(spread: dict[str, Any] | None, value: float | None, digits: int = 3) -> str:
    """A median over the runs with its [min-max] (a single value in older results)."""
    if not spread:
        return _ratio(value, digits)
    return (f"{spread['median']:.{digits}f} [{spread['min']:.{digits}f}-"
            f"{spread['max']:.{digits}f}]")  # fmt: skip


def _in_run(stage: dict[str, Any]) -> str:
    spread = stage.get("compute_s_per_step_spread")
    if not spread:
        return _ms(stage["compute_s_per_step"])
    return f"{_ms(spread['median'])} [{_ms(spread['min'])}-{_ms(spread['max'])}]"


def stage_header(result: dict[str, Any]) -> list[str]:
    limit = _targets(result)["inrun_over_corun"]
    return ["K", "split", "stage", "alone ms", "co-run ms", "in-run ms", "window steps",
            "co-run/alone", "in-run/co-run", "busy", "wait in", "wait out", "send ms/batch",
            "send/compute", f"K=2: in-run/co-run <= {limit}"]  # fmt: skip


def stage_rows(result: dict[str, Any]) -> list[list[Any]]:
    t = _targets(result)
    rows = []
    for k, per_k in result["per_k"].items():
        for split, c in per_k["splits"].items():
            for s, step_s in zip(c["stages"], c["stage_step_s"]):
                ratio = s.get("inrun_over_corun")
                judged = k == "2" and split in t["ratio_splits"] and ratio is not None
                verdict = _verdict(ratio <= t["inrun_over_corun"]) if judged else ""
                window = s.get("window", {})
                rows.append([k, split, s["stage"], _spread(s.get("alone")) if "alone" in s
                             else _ms(step_s), _spread(s.get("corun")),
                             _in_run(s), _f(window.get("steps"), 0),
                             _ratio(s.get("corun_over_alone")),
                             _paired(s.get("inrun_over_corun_spread"), ratio),
                             _f(s["busy"], 2), _f(s["wait_in"], 2), _f(s["wait_out"], 2),
                             _ms(s["send_s_per_batch"]), _f(s["transport_over_compute"], 3),
                             verdict])  # fmt: skip
    return rows


def profile_lines(result: dict[str, Any]) -> list[str]:
    et = result["equal_time"]
    blocks = ", ".join(f"{ms:.1f}" for ms in et["block_ms"])
    heads = sorted({round(ms, 1) for ms in et["head_ms"]})
    return [
        f"Per-block forward+backward ms (1 thread, batch {result['setting']['batch_size']}, "
        f"stem in block 1): {blocks}",
        "",
        f"Distinct head+loss forward+backward ms: {heads}",
        "",
    ]


def _work_line(result: dict[str, Any]) -> str:
    s, m = result["setting"], result.get("method", {})
    pipe = m.get("pipeline_steps", s["steps"])
    line = (
        f"Model {s['model']} (width {s['width'] or 'default'}), synthetic 3x32x32, batch "
        f"{s['batch_size']}. (a), (b), (d): {s['steps']} steps per run, {s['warmup']} warm-up "
        f"steps excluded. (c): {pipe} steps per run (one epoch, then one test batch); its "
        "samples/s and the per-stage in-run figures are over each stage's steady window "
        "(between its first periodic record and its last one before training ended)."
    )
    if m:
        line += (
            f" Standalone steps: {m['repeats']} launches, each timing every stage alone and "
            f"co-run for a window of {m['window_s']} s (at least ~{m['window_steps']} steps)"
        )
        paired = any("runs" in c for per_k in result.get("per_k", {}).values()
                     for c in per_k["splits"].values())
        line += (
            f", each launch followed by one (c) run of every (K, split): (c) ran {m['repeats']} "
            "times, and its figures are medians over those runs, every ratio to a standalone "
            "step taken within a repeat (in-run/co-run and efficiency (co-run): median "
            "[min-max] of the paired ratios)." if paired else "."
        )
    if "seconds" in result:
        line += f" Wall time of the benchmark: {result['seconds'] / 60:.1f} min."
    return line + load_line(result.get("machine_load"))


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"### Throughput ({result['preset']})",
        "",
        _work_line(result),
        f"Machine: {env['cpu']}, {env['cores']} cores; Python {env['python']}, torch "
        f"{env['torch']}, torchvision {env['torchvision']}. Command: `{env['command']}`",
        "",
        "#### Samples per second",
        "",
        *_table(["K", "experiment", "split", "samples/s", "vs best (a)"], throughput_rows(result)),
        "#### Pipeline efficiency and ratios",
        "",
        "Efficiency = (c) samples/s / (batch / slowest stage's standalone step alone); "
        "efficiency (co-run) = (c) samples/s / (batch / slowest stage's standalone step co-run). "
        "With repeated (c) runs, (c) samples/s and both efficiencies are medians over the runs, "
        "each run's efficiency against the standalone repeat just before it; the bounds "
        "shown are from the medians over all repeats. "
        "The 2-core bound is batch x min(K, cores) / sum of the stages' steps alone. "
        "c/d is against the best (d) of all schedules and micro-batch counts.",
        "",
        *_table(efficiency_header(result), pipeline_rows(result)),
        "#### Per stage",
        "",
        "Alone = the stage's modules' ModuleLearner.train_step on its real input, one process, "
        "1 thread, no other stage computing; co-run = the same, with every stage of the "
        "pipeline doing the same at once, one process each (median [min-max] over the "
        "repeats of each repeat's mean step). In-run = the stage's busy seconds per training "
        "step inside the pipeline over its steady window (window steps: how many; median "
        "[min-max] over the runs). "
        "co-run/alone is the machine's contention; in-run/co-run the runtime's cost. Busy, "
        "wait and send are over the same window; send = the sender thread's seconds per "
        "batch (on Gloo, includes waiting for the peer to post its recv).",
        "",
        *_table(stage_header(result), stage_rows(result)),
        "#### Equal-time profile",
        "",
        *profile_lines(result),
    ]
    return "\n".join(lines)
