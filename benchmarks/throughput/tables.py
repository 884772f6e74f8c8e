"""The benchmark's markdown tables and machine/library description, from its result JSON."""

from __future__ import annotations

import os
import platform
from typing import Any

EFFICIENCY_TARGET = 0.9
SPEEDUP_TARGET = 1.3  # c/d at K=2


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


def pipeline_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for k, per_k in result["per_k"].items():
        for split, c in per_k["splits"].items():
            eff = c["efficiency"] >= EFFICIENCY_TARGET
            speedup = c["c_over_d"] >= SPEEDUP_TARGET
            verdict = [_verdict(eff), _verdict(speedup)] if k == "2" else ["", ""]
            rows.append([k, split, c["blocks_per_module"], _f(c["samples_per_s"]),
                         _f(c["bound_samples_per_s"]), _f(c["efficiency"], 2),
                         _f(c["cpu_bound_samples_per_s"]), _f(c["c_over_a"], 2),
                         _f(c["c_over_d"], 2), *verdict])  # fmt: skip
    return rows


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def stage_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for k, per_k in result["per_k"].items():
        for split, c in per_k["splits"].items():
            for s, step_s in zip(c["stages"], c["stage_step_s"]):
                rows.append([k, split, s["stage"], _ms(step_s), _ms(s["compute_s_per_step"]),
                             _f(s["busy"], 2), _f(s["wait_in"], 2), _f(s["wait_out"], 2),
                             _ms(s["send_s_per_batch"]),
                             _f(s["transport_over_compute"], 3)])  # fmt: skip
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


def markdown(result: dict[str, Any]) -> str:
    s, env = result["setting"], result["environment"]
    lines = [
        f"### Throughput ({result['preset']})",
        "",
        f"Model {s['model']} (width {s['width'] or 'default'}), synthetic 3x32x32, batch "
        f"{s['batch_size']}, {s['steps']} steps per run ({s['warmup']} warm-up steps excluded "
        "in-process; the pipeline rate is the last stage's after its first periodic record).",
        f"Machine: {env['cpu']}, {env['cores']} cores; Python {env['python']}, torch "
        f"{env['torch']}, torchvision {env['torchvision']}. Command: `{env['command']}`",
        "",
        "#### Samples per second",
        "",
        *_table(["K", "experiment", "split", "samples/s", "vs best (a)"], throughput_rows(result)),
        "#### Pipeline efficiency and ratios",
        "",
        "Efficiency = (c) samples/s / (batch / slowest stage's standalone step). "
        "The 2-core bound is batch x min(K, cores) / sum of standalone stage steps. "
        "c/d is against the best (d) of all schedules and micro-batch counts.",
        "",
        *_table(
            [
                "K",
                "split",
                "blocks/module",
                "(c) samples/s",
                "slowest-stage bound",
                "efficiency",
                "2-core bound",
                "c/a",
                "c/d",
                f"K=2: efficiency >= {EFFICIENCY_TARGET}",
                f"K=2: c/d >= {SPEEDUP_TARGET}",
            ],
            pipeline_rows(result),
        ),  # fmt: skip
        "#### Per stage",
        "",
        "Standalone = one process, 1 thread, ModuleLearner.train_step of the stage's modules "
        "(median). In-run = busy seconds per step inside the pipeline. Send = the sender "
        "thread's seconds per batch (on Gloo, includes waiting for the peer to post its recv).",
        "",
        *_table(
            [
                "K",
                "split",
                "stage",
                "standalone ms",
                "in-run ms",
                "busy",
                "wait in",
                "wait out",
                "send ms/batch",
                "send/compute",
            ],
            stage_rows(result),
        ),  # fmt: skip
        "#### Equal-time profile",
        "",
        *profile_lines(result),
    ]
    return "\n".join(lines)
