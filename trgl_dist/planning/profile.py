"""Times measured the way the pipeline runs: on CPU, several processes computing at once
(each with one thread, as under torchrun), so the slowdown of processes sharing the cores'
caches and memory bandwidth is in the times; on GPU, each rank on its own device.

Two measurements: each block's forward+backward and its head's (``block_profile``: what the
equal-time split balances), and each module's whole training step (``module_steps``: what
the planner places on stages). A module's step is timed as one, ``ModuleLearner.train_step``
on an input of its shape, not summed from its blocks: timed alone, each block pays its own
backward call, its own optimizer call and a gradient for its input, and the sum came out
about a fifth above the module's real step.

In a run the ranks measure side by side and exchange their times over the control plane
(:func:`measure_on_ranks`); the planner command starts the processes itself
(:func:`measure_side_by_side`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from trgl_dist.config import Config
from trgl_dist.network.models import InputSpec
from trgl_dist.network.split import TIME_REPEATS, TimeProfile, median_seconds, profile_times
from trgl_dist.training.build import backbone_for, modules_for
from trgl_dist.training.learner import build_learners

log = logging.getLogger(__name__)
Measure = Callable[[], list[float]]


def usable_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def side_by_side(world_size: int, device: torch.device) -> int:
    """How many processes profile at once: as many as will compute at once in the run, on
    CPU at most one per core (more would measure time-sharing, which the model adds)."""
    if device.type == "cuda":
        return 1
    return max(1, min(world_size, usable_cores()))


def block_profile(config: Config, spec: InputSpec, device: str) -> list[float]:
    """This process's block and head times for ``config``'s model, batch size and head, as a
    flat list (``as_time_profile`` makes it a TimeProfile again)."""
    backbone = backbone_for(config.model, spec)
    with torch.random.fork_rng(devices=[]):
        profile = profile_times(backbone, spec, config.data.batch_size, config.model.head,
                                device=torch.device(device))  # fmt: skip
    return [v for f in dataclasses.fields(TimeProfile) for v in getattr(profile, f.name)]


def as_time_profile(flat: Sequence[float]) -> TimeProfile:
    """The inverse of ``block_profile``'s flattening (blocks, then one head per block)."""
    half = len(flat) // 2
    return TimeProfile(list(flat[:half]), list(flat[half:]))


def module_steps(
    config: Config, spec: InputSpec, counts: Sequence[int], device: str,
    repeats: int = TIME_REPEATS,
) -> list[float]:
    """Seconds of each module's training step (``counts`` blocks each) on ``device``: its
    ModuleLearner.train_step (forward, local loss, backward, optimizer step) on an input of
    its shape at the run's batch size, the median of ``repeats`` after a warm-up. On copies
    of fresh modules, so nothing of the run's model or RNG is touched."""
    target = torch.device(device)
    threads = torch.get_num_threads()
    if target.type == "cpu":
        torch.set_num_threads(1)  # a pipeline rank computes with one (torchrun's default)
    try:
        with torch.random.fork_rng(devices=[]):
            modules = [m.to(target) for m in modules_for(config.model, spec, counts)]
            learners = build_learners(config.replace("train", regime="parallel"), modules)
            batch = config.data.batch_size
            h = torch.rand(batch, spec.channels, spec.size, spec.size, device=target)
            y = torch.arange(batch, device=target) % spec.num_classes
            seconds = []
            alike: dict[tuple[object, ...], float] = {}  # modules that compute the same
            for learner in learners:
                kind = _signature(learner.module, h)
                if kind not in alike:
                    step = functools.partial(learner.train_step, h, y)
                    alike[kind] = median_seconds(step, repeats, target)
                seconds.append(alike[kind])
                with torch.no_grad():
                    h = learner.module.features(h)[0]
            return seconds
    finally:
        torch.set_num_threads(threads)


def _signature(module: torch.nn.Module, x: torch.Tensor) -> tuple[object, ...]:
    """What a module's step time depends on: its input's shape and its layers, in order,
    with their parameter shapes (ResNet-110 cut into 16 modules has a handful of kinds)."""
    layers = tuple(
        (type(m).__name__, *(tuple(p.shape) for p in m.parameters(recurse=False)))
        for m in module.modules()
    )
    return (tuple(x.shape), layers)


def measure_on_ranks(
    measure: Measure, group: dist.ProcessGroup | None, local_rank: int, profilers: int
) -> list[float]:
    """The first ``profilers`` ranks of each node run ``measure`` at once; every rank gets
    the mean of their results (an all-gather on the control plane, a Gloo group of every
    rank)."""
    mine_values = measure() if local_rank < profilers else None
    size = torch.tensor([len(mine_values) if mine_values else 0], dtype=torch.int64)
    dist.all_reduce(size, op=dist.ReduceOp.MAX, group=group)
    mine = torch.full((int(size.item()),), float("nan"), dtype=torch.float64)
    if mine_values is not None:
        mine[:] = torch.tensor(mine_values, dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    measured = [t for t in every if not torch.isnan(t).any()]
    return torch.stack(measured).mean(0).tolist()


def _child(measure: Measure, start: Any, results: Any) -> None:
    torch.set_num_threads(1)
    start.wait()  # begin together: the times are those of processes computing at once
    results.put(measure())


def measure_side_by_side(measure: Measure, processes: int) -> list[float]:
    """``processes`` fresh processes run ``measure`` (picklable) at once; the mean of their
    results."""
    if processes <= 1:
        return measure()
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes), context.Queue()
    children = [
        context.Process(target=_child, args=(measure, start, results)) for _ in range(processes)
    ]
    for child in children:
        child.start()
    try:
        outputs = [results.get(timeout=600) for _ in children]
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
    return [statistics.fmean(v) for v in zip(*outputs, strict=True)]
