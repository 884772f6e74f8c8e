"""Where TRGL's extra step time goes: the CPU time of every backward node, both methods."""

from __future__ import annotations

from typing import Any

import torch
from timing import METHODS, Setting, build_pair, timed_step
from torch.profiler import ProfilerActivity, profile

from trgl_dist.method import local_loss
from trgl_dist.training.learner import LossFn

#: Backward nodes listed in the profile table: the most extra TRGL time first.
TOP_OPS = 8
BACKWARD_NODE = "autograd::engine::evaluate_function: "


def op_times(
    setting: Setting, modules: int, steps: int, loss: LossFn = local_loss
) -> dict[str, dict[str, float]]:
    """CPU milliseconds per step of every autograd backward node (children included) and the
    self time of every other op, for each method (one thread), with the local loss ``loss``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pair = build_pair(setting, modules, loss)
        s = setting.spec
        x = torch.randn(setting.batch_size, s.channels, s.size, s.size)
        y = torch.randint(0, s.num_classes, (setting.batch_size,))
        out = {}
        for method in METHODS:
            timed_step(pair[method], x, y)  # warm
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    timed_step(pair[method], x, y)
            out[method] = {e.key: op_ms(e) / steps for e in prof.key_averages()}
    finally:
        torch.set_num_threads(threads)
    return out


def op_ms(event: Any) -> float:
    """A backward node's whole time (the kernels it runs), else the op's self time."""
    if event.key.startswith(BACKWARD_NODE):
        return event.cpu_time_total / 1000
    return event.self_cpu_time_total / 1000


def op_differences(times: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Backward nodes, most extra TRGL time first (the forward ops are the same in both:
    the transport cost is computed, and logged, for VanGL too)."""
    names = {n for method in METHODS for n in times[method] if n.startswith(BACKWARD_NODE)}
    rows = []
    for name in names:
        vanilla, trgl = times["vanilla"].get(name, 0.0), times["trgl"].get(name, 0.0)
        rows.append(
            {
                "op": name.removeprefix(BACKWARD_NODE),
                "vanilla_ms": vanilla,
                "trgl_ms": trgl,
                "extra_ms": trgl - vanilla,
            }
        )
    rows.sort(key=lambda r: -r["extra_ms"])
    return rows[:TOP_OPS]
