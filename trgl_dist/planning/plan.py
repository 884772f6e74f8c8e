"""A run's plan: what each module costs, the layout of stages and replicas for the ranks,
and the table of predicted step time, peak memory and throughput per stage."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
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


def block_counts(config: Config, spec: InputSpec, profile: TimeProfile) -> tuple[int, ...]:
    """Blocks per module: explicit counts, an equal-time split from ``profile``, or the
    configured split (which measures nothing)."""
    m = config.model
    if m.split_counts or m.split != "equal-time":
        return tuple(split_for(config, backbone_for(m, spec), spec))
    try:
        check_feasible(len(profile.blocks), m.modules, m.name)
        return tuple(balanced_partition(profile.blocks, m.modules, tails=profile.heads))
    except ValueError as err:
        raise ConfigError(f"model.split: {err}") from None


def module_seconds(profile: TimeProfile, counts: Sequence[int]) -> list[float]:
    """Each module's training step: its blocks' forward, backward and update, and those
    of its head (after its last block)."""
    starts = list(itertools.accumulate(counts, initial=0))
    out = []
    for a, b in itertools.pairwise(starts):
        blocks = sum(profile.blocks[a:b]) + sum(profile.block_updates[a:b])
        out.append(blocks + profile.heads[b - 1] + profile.head_updates[b - 1])
    return out


def workload(
    config: Config, spec: InputSpec, counts: Sequence[int], profile: TimeProfile
) -> Workload:
    batch = config.data.batch_size
    memory = module_memory(config, spec, counts, batch)
    costs = tuple(
        ModuleCost(t, m.state_mib, m.step_mib, m.grad_mib, m.out_mib)
        for t, m in zip(module_seconds(profile, counts), memory, strict=True)
    )
    data = batch * spec.channels * spec.size * spec.size * 4 + 2 * batch * 8
    return Workload(costs, batch, config.pipeline.buffer_size, data / MIB)


def make_plan(
    config: Config,
    spec: InputSpec,
    world_size: int,
    profile: TimeProfile,
    machine: Machine,
    memory_cap_mib: float = math.inf,
) -> Plan:
    """The layout for ``world_size`` ranks: the planner's choice with ``--plan auto``;
    otherwise the configured replicas, with the stages' modules balanced by time
    (``time``), spread evenly (``even``) or as given (``--stage-modules``)."""
    counts = block_counts(config, spec, profile)
    work = workload(config, spec, counts, profile)
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
