"""Which rank runs which stage and replica, and which replicas exchange batches (no torch here).

Stage s has R_s replicas; ranks are numbered stage by stage, replica by replica. Training
batch b (steps count from 1) is handled at stage s by replica (b - 1) mod R_s, so replica i
of stage s sends to replica j of stage s + 1 exactly when some b reaches both: when
i = j mod gcd(R_s, R_s+1). The test pass and its scoring run on replica 0 of every stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


class LayoutError(ValueError):
    """Replica counts that cannot make a run of this many ranks."""


@dataclass(frozen=True)
class Layout:
    """Replicas per stage, e.g. (2, 1): stage 0 on ranks 0 and 1, stage 1 on rank 2."""

    replicas: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.replicas or any(r < 1 for r in self.replicas):
            raise LayoutError(f"replica counts must be >= 1 each, got {list(self.replicas)}")

    @staticmethod
    def for_world(world_size: int, replicas: Sequence[int] = ()) -> Layout:
        """The layout of ``world_size`` ranks: one replica per stage by default; one count
        for every stage (the stages are then world_size / R); or one count per stage."""
        if not replicas:
            return Layout((1,) * world_size)
        if len(replicas) == 1:
            r = replicas[0]
            if r < 1 or world_size % r:
                raise LayoutError(
                    f"--stage-replicas {r}: {world_size} ranks are not a multiple of {r}"
                )
            return Layout((r,) * (world_size // r))
        layout = Layout(tuple(replicas))
        if layout.world_size != world_size:
            raise LayoutError(
                f"--stage-replicas {','.join(map(str, replicas))} needs {layout.world_size} "
                f"ranks, the launcher started {world_size}"
            )
        return layout

    @property
    def num_stages(self) -> int:
        return len(self.replicas)

    @property
    def world_size(self) -> int:
        return sum(self.replicas)

    @property
    def period(self) -> int:
        """Steps after which every stage's replicas have all stepped together (the lcm)."""
        return math.lcm(*self.replicas)

    def first_rank(self, stage: int) -> int:
        return sum(self.replicas[:stage])

    def rank_of(self, stage: int, replica: int) -> int:
        return self.first_rank(stage) + replica

    def place(self, rank: int) -> tuple[int, int]:
        """(stage, replica) of ``rank``."""
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is not in a layout of {self.world_size} ranks")
        stage = 0
        while rank >= self.first_rank(stage + 1):
            stage += 1
        return stage, rank - self.first_rank(stage)

    def stage_of(self, rank: int) -> int:
        return self.place(rank)[0]

    def replica_for(self, stage: int, step: int) -> int:
        """The replica of ``stage`` that trains on batch ``step`` (from 1)."""
        return (step - 1) % self.replicas[stage]

    def linked(self, stage: int, sender: int, receiver: int) -> bool:
        """Whether replica ``sender`` of ``stage`` sends batches to replica ``receiver`` of
        ``stage + 1``."""
        g = math.gcd(self.replicas[stage], self.replicas[stage + 1])
        return sender % g == receiver % g

    def links(self) -> list[tuple[int, int]]:
        """Every (sending rank, receiving rank) pair, in one order every rank agrees on."""
        pairs = []
        for stage in range(self.num_stages - 1):
            for i in range(self.replicas[stage]):
                for j in range(self.replicas[stage + 1]):
                    if self.linked(stage, i, j):
                        pairs.append((self.rank_of(stage, i), self.rank_of(stage + 1, j)))
        return pairs

    def describe(self, rank: int) -> str:
        """How people name a rank: "stage 1 (rank 1)", "stage 0 replica 1 (rank 1)"."""
        stage, replica = self.place(rank)
        if self.replicas[stage] == 1:
            return f"stage {stage} (rank {rank})"
        return f"stage {stage} replica {replica} (rank {rank})"
