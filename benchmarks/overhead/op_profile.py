"""Where TRGL's extra step time goes: per-op CPU time of both methods, and the transport alone."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from timing import METHODS, Setting, TransportCost, build_pair, timed_step
from torch.profiler import ProfilerActivity, profile

import trgl_dist.method

#: Backward nodes listed in the profile table: the most extra TRGL time first.
TOP_OPS = 8
BACKWARD_NODE = "autograd::engine::evaluate_function: "


def op_times(setting: Setting, modules: int, steps: int) -> dict[str, dict[str, float]]:
    """CPU milliseconds per step of every autograd backward node (children included) and the
    self time of every other op, for each method (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pair = build_pair(setting, modules)
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


def residue_shapes(setting: Setting, modules: int) -> list[tuple[int, ...]]:
    """The shape of every residue of the network, from one no-grad forward."""
    pair = build_pair(setting, modules)
    s = setting.spec
    h = torch.zeros(setting.batch_size, s.channels, s.size, s.size)
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad():
        for learner in pair["trgl"]:
            learner.module.eval()
            h, residues = learner.module.features(h)
            shapes += [tuple(r.shape) for r in residues]
    return shapes


def transport_seconds(
    shapes: Sequence[tuple[int, ...]], impl: TransportCost, backward: bool, repeats: int
) -> float:
    """Median seconds of the transport cost of every residue, forward (and backward)."""
    residues = [torch.randn(shape, requires_grad=True) for shape in shapes]
    times = []
    for _ in range(repeats + 1):  # the first one warms
        started = time.perf_counter()
        cost = impl(residues, "mean")
        if backward:
            cost.backward()
        times.append(time.perf_counter() - started)
        for r in residues:
            r.grad = None
    return statistics.median(times[1:])


def transport_alone(
    setting: Setting, modules: int, prototype: TransportCost, repeats: int
) -> dict[str, Any]:
    """The transport cost of the whole network alone, package vs prototype, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shapes = residue_shapes(setting, modules)
        impls: dict[str, TransportCost] = {
            "package": trgl_dist.method.transport_cost,
            "prototype": prototype,
        }
        out: dict[str, Any] = {"residues": len(shapes)}
        for name, impl in impls.items():
            out[name] = {
                "forward_ms": 1000 * transport_seconds(shapes, impl, False, repeats),
                "forward_backward_ms": 1000 * transport_seconds(shapes, impl, True, repeats),
            }
    finally:
        torch.set_num_threads(threads)
    return out
