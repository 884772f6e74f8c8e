"""Block times measured the way the pipeline runs: on CPU, several processes computing at
once (each with one thread, as under torchrun), so the slowdown of processes sharing the
cores' caches and memory bandwidth is in the times; on GPU, each rank on its own device.

In a run the ranks profile side by side and exchange their times over the control plane
(:func:`profile_on_ranks`); the planner command starts the processes itself
(:func:`profile_side_by_side`).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import statistics
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from trgl_dist.config import Config
from trgl_dist.network.models import InputSpec
from trgl_dist.network.split import TimeProfile, profile_times
from trgl_dist.training.build import backbone_for

log = logging.getLogger(__name__)


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


def profile_one(config: Config, spec: InputSpec, device: torch.device) -> TimeProfile:
    """This process's block times for ``config``'s model, batch size and head."""
    backbone = backbone_for(config.model, spec)
    with torch.random.fork_rng(devices=[]):
        return profile_times(backbone, spec, config.data.batch_size, config.model.head,
                             device=device)


def _flat(profile: TimeProfile) -> list[float]:
    return [v for f in dataclasses.fields(TimeProfile) for v in getattr(profile, f.name)]


def _unflat(values: Sequence[float], like: TimeProfile) -> TimeProfile:
    out, at = {}, 0
    for f in dataclasses.fields(TimeProfile):
        n = len(getattr(like, f.name))
        out[f.name] = list(values[at : at + n])
        at += n
    return TimeProfile(**out)


def profile_on_ranks(
    config: Config,
    spec: InputSpec,
    device: torch.device,
    group: dist.ProcessGroup | None,
    local_rank: int,
    profilers: int,
) -> TimeProfile:
    """The first ``profilers`` ranks of each node profile at once; every rank gets the mean
    of their times (an all-gather on the control plane, a Gloo group of every rank)."""
    profiles = profile_one(config, spec, device) if local_rank < profilers else None
    size = torch.tensor([len(_flat(profiles)) if profiles else 0], dtype=torch.int64)
    dist.all_reduce(size, op=dist.ReduceOp.MAX, group=group)
    mine = torch.full((int(size.item()),), float("nan"), dtype=torch.float64)
    if profiles is not None:
        mine[:] = torch.tensor(_flat(profiles), dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    measured = [t for t in every if not torch.isnan(t).any()]
    mean = torch.stack(measured).mean(0).tolist()
    template = profiles or _template(config, spec)
    return _unflat(mean, template)


def _template(config: Config, spec: InputSpec) -> TimeProfile:
    """A profile of the right lengths for the model (values unused)."""
    blocks = len(backbone_for(config.model, spec).blocks)
    return TimeProfile([0.0] * blocks, [0.0] * blocks, [0.0] * blocks, [0.0] * blocks)


def _child(config: Config, spec: InputSpec, device: str, start: Any, results: Any) -> None:
    torch.set_num_threads(1)
    start.wait()  # begin together: the times are those of processes computing at once
    results.put(_flat(profile_one(config, spec, torch.device(device))))


def profile_side_by_side(
    config: Config, spec: InputSpec, device: torch.device, processes: int
) -> TimeProfile:
    """``processes`` fresh processes profile at once; the mean of their times."""
    if processes <= 1:
        return profile_one(config, spec, device)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes), context.Queue()
    children = [
        context.Process(target=_child, args=(config, spec, str(device), start, results))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    try:
        flats = [results.get(timeout=600) for _ in children]
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
    return _unflat([statistics.fmean(v) for v in zip(*flats, strict=True)], _template(config, spec))
