"""The planner's cost model: a layout's per-stage step time, peak memory and throughput,
and the layout that maximizes throughput (pure arithmetic, no torch).

A training batch visits every stage once and is handled there by one replica; a stage's
replicas take turns, so a replica of stage s handles one batch in R_s. Per batch, stage s
costs ``w_s`` seconds of compute: its modules' training steps, plus, with replicas, one
gradient all-reduce. With a device per rank (GPU), a replica's step takes ``w_s`` and the
pipeline runs at T = min_s R_s / w_s batches/s, the pace of its slowest stage.

Where the ranks share C CPU cores, a replica's step is stretched by the time it waits for
a core. The model is processor sharing, in a mean-field form: replica p is runnable (busy)
a fraction b_p of the time; while it and n others are runnable it computes at a rate of
min(1, C / (n + 1)) of a core; taking the others as independent, its step takes
w_s / E[min(1, C / (1 + N_p))] with N_p the number of the others busy at a random moment
(a sum of Bernoulli(b_q)). The busy fractions follow from the steps
(b_p = T w_s stretch_s / R_s, at most 1) and T from the slowest stretched stage, so the
model is solved as a fixed point. It gives what a mean over one core does not: a light
stage that shares a core with a busy one waits while the busy one runs, so its steps
stretch far more than the core's average load says. The module times are measured with
processes computing side by side (profile.py), so the slowdown of two processes sharing
memory bandwidth is in them; the model adds the time-sharing.

Memory of a replica: its modules' resident state (parameters, gradients, optimizer state,
BatchNorm buffers), the largest extra peak of one module's step (activations and the
backward's scratch), with replicas one flat copy of a module's gradients for the
all-reduce, and its queued batches: stages before the bottleneck run with full inboxes and
outboxes (backpressure), the bottleneck with a full inbox, stages after it with empty ones.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

#: Candidates within this fraction of the best throughput count as equally fast: the
#: planner then prefers fewer replicas (fewer all-reduces), balance, then less memory.
EQUAL_SPEED = 0.01
#: Replica layouts tried per stage count at most; more are sampled evenly.
MAX_COMPOSITIONS = 20_000


@dataclass(frozen=True)
class ModuleCost:
    """What one module costs per training batch (seconds) and holds (MiB)."""

    seconds: float  # forward + backward of its blocks and head, and its update
    state_mib: float  # parameters, gradients, optimizer state, BatchNorm buffers
    step_mib: float  # extra peak of its step: activations and the backward's scratch
    grad_mib: float  # its gradients: the all-reduce of a replica copies them once
    out_mib: float  # one batch of its output, as queued between stages


@dataclass(frozen=True)
class Machine:
    """Where the ranks run: the cores they share (inf: each has its own GPU) and the
    gradient all-reduce's speed."""

    cores: float = math.inf
    allreduce_mib_per_s: float = 2000.0
    allreduce_latency_s: float = 2e-4

    def allreduce_s(self, mib: float, replicas: int) -> float:
        """One replica's part in a ring all-reduce of ``mib`` among ``replicas``."""
        if replicas <= 1:
            return 0.0
        moved = 2.0 * (replicas - 1) / replicas * mib
        return self.allreduce_latency_s + moved / self.allreduce_mib_per_s


@dataclass(frozen=True)
class StagePrediction:
    modules: range
    replicas: int
    step_s: float  # one replica's wall time per batch, as it will run
    compute_s: float  # its cost per batch before any sharing of cores
    peak_mib: float


@dataclass(frozen=True)
class Prediction:
    stages: tuple[StagePrediction, ...]
    batches_per_s: float
    batch_size: int
    bottleneck: int

    @property
    def samples_per_s(self) -> float:
        return self.batches_per_s * self.batch_size

    @property
    def stage_modules(self) -> tuple[int, ...]:
        return tuple(len(s.modules) for s in self.stages)

    @property
    def replicas(self) -> tuple[int, ...]:
        return tuple(s.replicas for s in self.stages)

    def as_dict(self) -> dict[str, object]:
        """What the run's report compares its measurements with."""
        return {
            "samples_per_s": self.samples_per_s,
            "stages": [
                {
                    "modules": list(s.modules),
                    "replicas": s.replicas,
                    "step_ms": 1000.0 * s.step_s,
                    "peak_mib": s.peak_mib,
                }
                for s in self.stages
            ],
        }


@dataclass(frozen=True)
class Workload:
    """The modules' costs and what every layout shares: batch size, buffer bound, the
    first stage's input batch."""

    costs: tuple[ModuleCost, ...]
    batch_size: int
    buffer_size: int
    input_mib: float  # one batch of data, as stage 0 holds it

    @functools.cache  # noqa: B019 - a few planner calls, each on few ranges
    def compute_s(self, modules: range, replicas: int, machine: Machine) -> float:
        seconds = sum(self.costs[k].seconds for k in modules)
        return seconds + sum(machine.allreduce_s(self.costs[k].grad_mib, replicas) for k in modules)

    @functools.cache  # noqa: B019
    def resident_mib(self, modules: range, replicas: int) -> float:
        """A replica's memory without its queued batches."""
        parts = [self.costs[k] for k in modules]
        peak = sum(c.state_mib for c in parts) + max(c.step_mib for c in parts)
        return peak + (max(c.grad_mib for c in parts) if replicas > 1 else 0.0)

    def batch_mib(self, modules: range, side: str) -> float:
        if side == "in":
            return self.input_mib if modules.start == 0 else self.costs[modules.start - 1].out_mib
        return self.costs[modules.stop - 1].out_mib


def predict(
    work: Workload, stage_modules: Sequence[int], replicas: Sequence[int], machine: Machine
) -> Prediction:
    """Step time, peak memory and throughput of one layout."""
    ranges = _ranges(stage_modules)
    compute = [work.compute_s(r, n, machine) for r, n in zip(ranges, replicas, strict=True)]
    stretch = shared_cores(compute, replicas, machine.cores)
    steps = [w * f for w, f in zip(compute, stretch, strict=True)]
    rate = min((n / t for n, t in zip(replicas, steps, strict=True) if t > 0), default=math.inf)
    bottleneck = max(range(len(ranges)), key=lambda s: steps[s] / replicas[s])
    stages = tuple(
        StagePrediction(
            modules=r,
            replicas=n,
            step_s=t,
            compute_s=w,
            peak_mib=work.resident_mib(r, n) + _queued_mib(work, r, s, bottleneck, len(ranges)),
        )
        for s, (r, n, w, t) in enumerate(zip(ranges, replicas, compute, steps, strict=True))
    )
    return Prediction(stages, rate, work.batch_size, bottleneck)


#: The fixed point of ``shared_cores``: iterations at most, and the change that ends them.
SHARING_ITERATIONS = 200
SHARING_TOLERANCE = 1e-9


def shared_cores(compute: Sequence[float], replicas: Sequence[int], cores: float) -> list[float]:
    """Per stage, the factor by which time-sharing ``cores`` stretches a replica's step
    (1.0 each when every rank has a device of its own; see the module docstring)."""
    stretch = [1.0] * len(compute)
    if math.isinf(cores) or sum(replicas) <= cores or not any(compute):
        return stretch
    for _ in range(SHARING_ITERATIONS):
        steps = [w * f for w, f in zip(compute, stretch, strict=True)]
        rate = min(n / t for n, t in zip(replicas, steps, strict=True) if t > 0)
        busy = [min(1.0, rate * t / n) for n, t in zip(replicas, steps, strict=True)]
        # Every replica of stage s is busy busy[s] of the time.
        processes = [b for b, n in zip(busy, replicas, strict=True) for _ in range(n)]
        new = []
        for b in busy:
            others = list(processes)
            others.remove(b)  # this replica itself
            new.append(1.0 / _mean_share(others, cores))
        moved = max(abs(a - b) for a, b in zip(new, stretch, strict=True))
        stretch = [0.5 * (a + b) for a, b in zip(new, stretch, strict=True)]  # damped
        if moved < SHARING_TOLERANCE:
            break
    return stretch


def _mean_share(others: Sequence[float], cores: float) -> float:
    """E[min(1, cores / (1 + N))], N the number of ``others`` busy, each independently with
    its probability: the share of a core a busy process gets on average."""
    counts = [1.0]  # counts[n]: the probability that n of the others are busy
    for b in others:
        counts = [
            (counts[n] if n < len(counts) else 0.0) * (1 - b)
            + (counts[n - 1] * b if n > 0 else 0.0)
            for n in range(len(counts) + 1)
        ]
    return sum(p * min(1.0, cores / (1 + n)) for n, p in enumerate(counts))


def _queued_mib(work: Workload, modules: range, stage: int, bottleneck: int, stages: int) -> float:
    """Batches waiting in a replica's inbox and outbox under backpressure."""
    full = work.buffer_size
    inbox = full if 0 < stage <= bottleneck else 0
    outbox = full if stage < bottleneck and stage < stages - 1 else 0
    return inbox * work.batch_mib(modules, "in") + outbox * work.batch_mib(modules, "out")


def _ranges(stage_modules: Sequence[int]) -> list[range]:
    starts = list(itertools.accumulate(stage_modules, initial=0))
    return [range(a, b) for a, b in itertools.pairwise(starts)]


def balance(
    work: Workload, replicas: Sequence[int], machine: Machine, memory_cap_mib: float = math.inf
) -> tuple[int, ...] | None:
    """Modules per stage, contiguous, that minimize the largest per-replica load
    max_s w_s / R_s (exact DP), with every replica under the memory cap; None when no
    split fits."""
    k, stages = len(work.costs), len(replicas)
    if stages > k:
        return None
    inf = math.inf
    best = [[inf] * (k + 1) for _ in range(stages + 1)]
    cut = [[0] * (k + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        n = replicas[s - 1]
        for i in range(s, k - (stages - s) + 1):
            for j in range(s - 1, i):
                if best[s - 1][j] == inf:
                    continue
                modules = range(j, i)
                if work.resident_mib(modules, n) > memory_cap_mib:
                    continue
                load = max(best[s - 1][j], work.compute_s(modules, n, machine) / n)
                if load < best[s][i]:
                    best[s][i], cut[s][i] = load, j
    if best[stages][k] == inf:
        return None
    counts, i = [], k
    for s in range(stages, 0, -1):
        counts.append(i - cut[s][i])
        i = cut[s][i]
    return tuple(reversed(counts))


def search(
    work: Workload, world_size: int, machine: Machine, memory_cap_mib: float = math.inf
) -> Prediction | None:
    """The layout of ``world_size`` ranks (stages, modules per stage, replicas per stage)
    with the highest predicted throughput whose replicas all fit under the memory cap;
    among equally fast ones, fewer replicas, then the better balanced, then less memory.
    None when none fits."""
    candidates = []
    for stages in range(1, min(len(work.costs), world_size) + 1):
        for replicas in _compositions(world_size, stages):
            counts = balance(work, replicas, machine, memory_cap_mib)
            if counts is not None:
                candidates.append(predict(work, counts, replicas, machine))
    if not candidates:
        return None
    fastest = max(c.batches_per_s for c in candidates)
    near = [c for c in candidates if c.batches_per_s >= fastest * (1 - EQUAL_SPEED)]
    return min(near, key=lambda c: (sum(c.replicas) - len(c.stages), _load(c), _peak(c)))


def _load(prediction: Prediction) -> float:
    """The largest per-replica load: lower is better balanced."""
    return max(s.compute_s / s.replicas for s in prediction.stages)


def _peak(prediction: Prediction) -> float:
    return max(s.peak_mib for s in prediction.stages)


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write ``total`` as ``parts`` positive counts, in order (at most
    MAX_COMPOSITIONS of them, evenly sampled when there are more)."""
    count = math.comb(total - 1, parts - 1)
    stride = max(1, count // MAX_COMPOSITIONS)
    for n, bars in enumerate(itertools.combinations(range(1, total), parts - 1)):
        if n % stride == 0:
            edges = (0, *bars, total)
            yield tuple(b - a for a, b in itertools.pairwise(edges))
