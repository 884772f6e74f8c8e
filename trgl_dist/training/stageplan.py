"""What a stage is to do beyond its batches: which modules it holds, when it reports and
saves, which replica of how many it is, where a resumed one starts; and its clock."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


def stage_modules(num_modules: int, world_size: int, stage: int) -> range:
    """The contiguous modules of a stage; earlier stages take the remainder."""
    if world_size > num_modules:
        raise ValueError(
            f"more ranks ({world_size}) than modules ({num_modules}): "
            f"use --modules {world_size} or more, or fewer processes"
        )
    base, extra = divmod(num_modules, world_size)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


@dataclass(frozen=True)
class StagePlan:
    """When a stage reports and saves, where a resumed one starts, and which replica of how
    many it is."""

    log_every: int = 20  # a train record per module every this many of its batches
    checkpoint_every: int = 0  # steps; 0: only at each epoch's end
    start_step: int = 0  # resumed: the checkpoint's step
    steps_per_epoch: int = 1
    replica: int = 0  # replicas of a stage train batches (s - 1) mod R = replica, R = replicas
    replicas: int = 1
    period: int = 1  # a checkpoint needs every stage's replicas stepped together: its multiples
    final_step: int = 0  # the run's last training step (0: unknown)
    probe_memory: bool = False  # measure one step's peak memory (MemTracker, real tensors)

    def state_step(self, step: int) -> int:
        """The step a replica's modules are at after training batch ``step``: the end of that
        batch's window (every replica of the stage has stepped by then)."""
        end = ((step - 1) // self.replicas + 1) * self.replicas
        return min(end, self.final_step) if self.final_step else end

    def epoch_of(self, step: int) -> int:
        return (step - 1) // self.steps_per_epoch

    def window_epoch(self, step: int) -> int:
        """The epoch whose learning rate the optimizer step after batch ``step`` takes: the
        epoch of the last batch of its window, so a window across an epoch's end steps as
        one process accumulating it would, on every replica."""
        return self.epoch_of(self.state_step(step))


@dataclass
class StageClock:
    """Host time waiting for input and to pass output on (busy time is the timer's)."""

    wait_in: float = 0.0
    wait_out: float = 0.0
    samples: int = 0
    bytes_sent: int = 0
    started: float = field(default_factory=time.perf_counter)
