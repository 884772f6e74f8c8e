"""The named experiments: (a) every split of the modules without replicas, (b) the
planner's layout, (c) E2E in one process; each as the command that runs it."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchenv import torchrun
from processes import HERE

KINDS = {
    "a": "(a) split, no replicas",
    "b": "(b) planner's layout",
    "c": "(c) E2E, one process",
}


@dataclass(frozen=True)
class Setting:
    """The model, data and run length every experiment shares."""

    model: str
    width: int
    modules: int
    split: str
    batch_size: int
    steps: int
    ranks: int

    @property
    def train_samples(self) -> int:
        # One epoch holds every step: no epoch-end checkpoint falls among the timed steps.
        return self.steps * self.batch_size

    def flags(self) -> list[str]:
        """The trgl_dist.train flags of the model, data and run length."""
        return [
            "--dataset", "synthetic",
            "--synthetic-train", str(self.train_samples),
            # The test pass scores batches of twice the training batch: this is one of them.
            "--synthetic-test", str(2 * self.batch_size),
            "--model", self.model,
            "--width", str(self.width),
            "--modules", str(self.modules),
            "--split", self.split,
            "--batch-size", str(self.batch_size),
            "--max-steps", str(self.steps),
            "--eval-every", "0",
            "--seed", "0",
        ]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "train_samples": self.train_samples}


@dataclass(frozen=True)
class Experiment:
    """One configuration; (a) and (b) under torchrun, one rank per stage replica."""

    name: str
    kind: str
    stage_modules: tuple[int, ...] = ()
    replicas: tuple[int, ...] = ()

    @property
    def pipeline(self) -> bool:
        return self.kind != "c"

    @property
    def processes(self) -> int:
        return sum(self.replicas) if self.pipeline else 1

    @property
    def threads(self) -> int | None:
        """Threads per process: one per rank, as torchrun sets; E2E: torch's default."""
        return 1 if self.pipeline else None

    def command(self, setting: Setting, run_dir: Path) -> list[str]:
        if not self.pipeline:
            launcher = [sys.executable, "-m", "trgl_dist.train", "--regime", "e2e"]
            return [*launcher, *setting.flags(), "--out", str(run_dir)]
        layout = [
            "--regime", "pipeline",
            "--stage-modules", _csv(self.stage_modules),
            "--stage-replicas", _csv(self.replicas),
        ]  # fmt: skip
        launcher = [*torchrun(self.processes), "-m", "trgl_dist.train"]
        return [*launcher, *setting.flags(), *layout, "--out", str(run_dir)]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "stage_modules": list(self.stage_modules),
            "replicas": list(self.replicas),
            "processes": self.processes,
        }


def _csv(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


def layout_name(stage_modules: Sequence[int], replicas: Sequence[int]) -> str:
    """ "1x2+3" : stage 0 with 1 module on 2 replicas, stage 1 with 3 modules on one."""
    return "+".join(
        f"{m}x{r}" if r > 1 else str(m) for m, r in zip(stage_modules, replicas, strict=True)
    )


def contiguous_splits(modules: int, stages: int) -> list[tuple[int, ...]]:
    """Every way to cut ``modules`` modules into ``stages`` non-empty consecutive runs."""
    splits = []
    for cuts in itertools.combinations(range(1, modules), stages - 1):
        edges = (0, *cuts, modules)
        splits.append(tuple(b - a for a, b in itertools.pairwise(edges)))
    return splits


def experiments(setting: Setting, plan: dict[str, Any]) -> list[Experiment]:
    """(a) one per contiguous split of the modules over the ranks, (b) the layout
    ``plan`` (the planner's JSON) chose, (c) E2E."""
    ones = (1,) * setting.ranks
    found = [
        Experiment(f"a/{layout_name(split, ones)}", "a", split, ones)
        for split in contiguous_splits(setting.modules, setting.ranks)
    ]
    modules, replicas = tuple(plan["stage_modules"]), tuple(plan["replicas"])
    found.append(Experiment(f"b/{layout_name(modules, replicas)}", "b", modules, replicas))
    found.append(Experiment("c/e2e", "c"))
    return found


def planner_command(setting: Setting, out: Path) -> list[str]:
    """The planner for ``setting.ranks`` ranks on this machine's CPU cores."""
    script = HERE / "planner.py"
    flags = ["--world-size", str(setting.ranks), "--device", "cpu"]
    return [sys.executable, str(script), str(out), *flags, *setting.flags()]
