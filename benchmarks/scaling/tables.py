"""The results JSON as markdown: the setting, samples/s of every experiment, and the
planner's per-stage prediction against the measurement."""

from __future__ import annotations

from typing import Any

from benchenv import environment_lines, markdown_table
from experiments import KINDS


def _value(s: dict[str, Any] | None, fmt: str = ".1f", unit: str = "") -> str:
    """median [min-max] of a spread; the median alone for one repeat."""
    if s is None:
        return "-"
    median = f"{format(s['median'], fmt)}{unit}"
    if len(s["values"]) < 2:
        return median
    return f"{median} [{format(s['min'], fmt)}{unit} - {format(s['max'], fmt)}{unit}]"


def _error(s: dict[str, Any] | None) -> str:
    return "-" if s is None else _value({k: _pct(v) for k, v in s.items()}, "+.1f", "%")


def _pct(v: Any) -> Any:
    return [100 * x for x in v] if isinstance(v, list) else 100 * v


def _layout(e: dict[str, Any], setting: dict[str, Any]) -> str:
    if e["kind"] == "c":
        return f"all {setting['modules']} modules"
    return e["name"].split("/", 1)[1]


def _throughput_rows(result: dict[str, Any]) -> list[list[str]]:
    setting, best = result["setting"], result["best_a"]
    reference = result["experiments"][best]["samples_per_s"]["median"]
    rows = []
    for name, e in result["experiments"].items():
        label = KINDS[e["kind"]] + (" **(best)**" if name == best else "")
        threads = e["threads"]
        rows.append(
            [
                label,
                _layout(e, setting),
                f"{e['processes']} x {threads}",
                _value(e["samples_per_s"]),
                f"{e['samples_per_s']['median'] / reference:.2f}",
                _value(e["predicted_samples_per_s"]),
                _error(e["throughput_error"]),
            ]
        )
    return rows


def _stage_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for e in result["experiments"].values():
        if e["kind"] == "c":
            continue
        for s in e["stages"]:
            modules = s["modules"]
            span = f"{modules[0]}-{modules[-1]}" if len(modules) > 1 else str(modules[0])
            rows.append(
                [
                    f"({e['kind']}) {_layout(e, result['setting'])}",
                    str(s["stage"]),
                    span,
                    str(s["replicas"]),
                    _value(s["predicted_step_ms"]),
                    _value(s["step_ms"]),
                    _error(s["step_error"]),
                    _value(s["predicted_peak_mib"]),
                    _value(s["peak_mib"]),
                    _error(s["peak_error"]),
                ]
            )
    return rows


def _setting_line(result: dict[str, Any]) -> str:
    s, env = result["setting"], result["environment"]
    blocks = result["blocks_per_module"]
    return (
        f"{s['model']}, width {s['width']}, K = {s['modules']} modules of {blocks} blocks "
        f"({s['split']}), synthetic 3x32x32 data, batch {s['batch_size']}, {s['steps']} "
        f"steps per run; N = {s['ranks']} ranks on {env['cores']} cores; {result['repeats']} "
        f"repeat(s) of every experiment, interleaved "
        f"({'median [min - max]' if result['repeats'] > 1 else 'one value each'}).\n"
    )


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    ratios = result["ratios"]
    steady, runs = result["steady_runs"], result["run_count"]
    lines = [
        f"### Scaling past an unsplittable first module ({result['preset']})\n",
        _setting_line(result),
        environment_lines(env),
        f"E2E ran with torch's default of {env['e2e_threads']} threads; every pipeline rank "
        "with 1 (OMP_NUM_THREADS=1, torchrun's default).\n",
        f"#### The planner's layout for {result['setting']['ranks']} ranks, before the runs\n",
        "```text\n" + result["plan"]["table"] + "\n```\n",
        "#### Samples per second\n",
        markdown_table(
            "experiment | layout | processes x threads | samples/s | vs best (a) "
            "| predicted samples/s | prediction error",
            _throughput_rows(result),
        ),
        f"(b) / best (a): **{ratios['b_over_best_a']:.2f}**; (b) / (c): "
        f"**{ratios['b_over_c']:.2f}**; best (a) / (c): {ratios['best_a_over_c']:.2f}. "
        "Layout: modules per stage, `x2` a stage on two replicas. samples/s: the last "
        f"stage's, over its steady window in {steady} of {runs} runs (the others: over the "
        "whole run). Predicted: the planner inside each run, for the layout it ran. "
        "Error = (predicted - measured) / measured.\n",
        "#### Per stage: the planner against the measurement\n",
        markdown_table(
            "experiment | stage | modules | replicas | step ms, predicted | step ms, measured "
            "| error | peak MiB, predicted | peak MiB, measured | error",
            _stage_rows(result),
        ),
        "Measured step: the stage's mean compute of a training step after its 5 warm-up "
        "batches (a replicated stage: the mean of its replicas). Measured peak: MemTracker "
        "on the real tensors of the stage's 3rd training step plus the most its buffers "
        "held (a replicated stage: the largest replica). Predicted: the planner's "
        "block profile and its fake-tensor memory estimate.\n",
    ]
    return "\n".join(lines)
