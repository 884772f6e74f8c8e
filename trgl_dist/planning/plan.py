"""A run's plan: what each module costs, the layout of stages and replicas for the ranks,
and the table of predicted step time, peak memory and throughput per stage."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trgl_dist.config import Config
from trgl_dist.errors import ConfigError
from trgl_dist.layout import Layout, LayoutError
from trgl_dist.network.models import InputSpec
from trgl_dist.network.split import TimeProfile, balanced_partition, check_feasible
from trgl_dist.planning.memory import module_memory
from trgl_dist.planning.model import (
    Machine,
    ModuleCost,
    Prediction,
    Workload,
    balance,
    predict,
    search,
)
from trgl_dist.planning.profile import Measure, as_time_profile, block_profile, module_steps
from trgl_dist.training.build import backbone_for, split_for
from trgl_dist.training.memory import MIB

#: Gradient all-reduce speeds assumed by the planner: Gloo between processes of one host,
#: NCCL between GPUs (MiB/s, seconds of latency per call).
ALLREDUCE = {"cpu": (1000.0, 3e-4), "cuda": (10_000.0, 1e-4)}


@dataclass(frozen=True)
class Plan:
    """Blocks per module, the layout, and what the planner predicts for it."""

    counts: tuple[int, ...]
    prediction: Prediction
    plan: str

    def apply(self, config: Config) -> Config:
        """The config the ranks run with: the split, modules per stage and replicas made
        explicit."""
        p = self.prediction
        config = config.replace("model", split_counts=self.counts)
        return config.replace(
            "pipeline", stage_modules=p.stage_modules, stage_replicas=p.replicas
        )

    def as_dict(self) -> dict[str, Any]:
        counts = list(self.counts)
        return {"plan": self.plan, "blocks_per_module": counts, **self.prediction.as_dict()}


def machine_for(device: torch.device, cores: float | None = None) -> Machine:
    """CPU ranks share ``cores``; GPU ranks each have a device of their own."""
    bandwidth, latency = ALLREDUCE["cuda" if device.type == "cuda" else "cpu"]
    shared = math.inf if device.type == "cuda" else float(cores or 1)
    return Machine(shared, bandwidth, latency)


def needs_block_profile(config: Config) -> bool:
    """Whether the blocks per module come from measured block times (an equal-time split
    not yet made explicit)."""
    return config.model.split == "equal-time" and not config.model.split_counts


def block_counts(
    config: Config, spec: InputSpec, profile: TimeProfile | None = None
) -> tuple[int, ...]:
    """Blocks per module: explicit counts, an equal-time split from ``profile`` (see
    ``needs_block_profile``), or the configured split (which measures nothing)."""
    m = config.model
    if not needs_block_profile(config):
        return tuple(split_for(config, backbone_for(m, spec), spec))
    if profile is None:
        raise ValueError("an equal-time split needs the block profile")
    try:
        check_feasible(len(profile.blocks), m.modules, m.name)
        return tuple(balanced_partition(profile.blocks, m.modules, tails=profile.heads))
    except ValueError as err:
        raise ConfigError(f"model.split: {err}") from None


def measured_modules(
    config: Config, spec: InputSpec, device: torch.device,
    measure: Callable[[Measure], list[float]],
) -> tuple[tuple[int, ...], list[float]]:
    """Blocks per module and each module's step seconds, measured through ``measure`` (side
    by side in fresh processes, or on the run's ranks): the block profile first when the
    split is an equal-time one still to be made, then every module's training step."""
    profile = None
    if needs_block_profile(config):
        profile = as_time_profile(measure(functools.partial(block_profile, config, spec,
                                                            str(device))))  # fmt: skip
    counts = block_counts(config, spec, profile)
    seconds = measure(functools.partial(module_steps, config, spec, counts, str(device)))
    return counts, seconds


def workload(
    config: Config, spec: InputSpec, counts: Sequence[int], seconds: Sequence[float]
) -> Workload:
    """The modules' measured step ``seconds`` and fake-tensor memory, and the batch."""
    batch = config.data.batch_size
    memory = module_memory(config, spec, counts, batch)
    costs = tuple(
        ModuleCost(t, m.state_mib, m.step_mib, m.grad_mib, m.out_mib)
        for t, m in zip(seconds, memory, strict=True)
    )
    data = batch * spec.channels * spec.size * spec.size * 4 + 2 * batch * 8
    return Workload(costs, batch, config.pipeline.buffer_size, data / MIB)


def make_plan(
    config: Config,
    spec: InputSpec,
    world_size: int,
    counts: Sequence[int],
    seconds: Sequence[float],
    machine: Machine,
    memory_cap_mib: float = math.inf,
) -> Plan:
    """The layout for ``world_size`` ranks of the modules of ``counts`` blocks whose steps
    take ``seconds``: the planner's choice with ``--plan auto``; otherwise the configured
    replicas, with the stages' modules balanced by time (``time``), spread evenly
    (``even``) or as given (``--stage-modules``)."""
    counts = tuple(counts)
    work = workload(config, spec, counts, seconds)
    p = config.pipeline
    if p.plan == "auto":
        found = search(work, world_size, machine, memory_cap_mib)
        if found is None:
            raise ConfigError(
                f"no layout of {world_size} ranks fits every replica under {memory_cap_mib:.0f} "
                "MiB (--memory-cap)"
            )
        return Plan(counts, found, p.plan)
    try:
        replicas = Layout.for_world(world_size, p.stage_replicas).replicas
    except LayoutError as err:
        raise ConfigError(str(err)) from None
    modules = config.model.modules
    if len(replicas) > modules:
        ranks = "ranks" if len(replicas) == world_size else "stages"
        raise ConfigError(f"more {ranks} ({len(replicas)}) than modules ({modules})")
    stage_modules = p.stage_modules or _spread(work, replicas, machine, p.plan)
    if len(stage_modules) != len(replicas):
        raise ConfigError(
            f"pipeline.stage_modules has {len(stage_modules)} counts for {len(replicas)} stages"
        )
    return Plan(counts, predict(work, stage_modules, replicas, machine), p.plan)


def _spread(
    work: Workload, replicas: Sequence[int], machine: Machine, plan: str
) -> tuple[int, ...]:
    if plan == "time":
        balanced = balance(work, replicas, machine)
        if balanced is not None:
            return balanced
    base, extra = divmod(len(work.costs), len(replicas))
    return tuple(base + 1 if s < extra else base for s in range(len(replicas)))


def table(plan: Plan) -> str:
    """The plan for people: one row per stage, then the pipeline's throughput."""
    p = plan.prediction
    rows = [("stage", "modules", "blocks", "replicas", "step ms", "peak MiB", "samples/s")]
    starts = list(itertools.accumulate(plan.counts, initial=0))
    for s, stage in enumerate(p.stages):
        first, last = stage.modules.start, stage.modules.stop - 1
        blocks = starts[last + 1] - starts[first]
        capacity = stage.replicas * p.batch_size / stage.step_s if stage.step_s else math.inf
        rows.append((
            str(s),
            f"{first + 1}-{last + 1}" if last > first else str(first + 1),
            str(blocks),
            str(stage.replicas),
            f"{1000 * stage.step_s:.1f}",
            f"{stage.peak_mib:.0f}",
            f"{capacity:.0f}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    bottleneck = p.bottleneck
    lines.append(
        f"predicted: {p.samples_per_s:.0f} samples/s, bottleneck stage {bottleneck} "
        f"(stage s sustains replicas x batch / step samples/s)"
    )
    return "\n".join(lines)
