"""What every run of the check shares: device, model flags, steps, deadlines, environment."""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES = 4
SEED = 0
#: ResNet-110 at batch 128 on synthetic CIFAR-sized data: real work for a GPU, and all seven
#: checks well inside 8 minutes on one modern GPU.
CUDA_FLAGS = tuple(
    shlex.split(
        "--dataset synthetic --model resnet110 --batch-size 128 --synthetic-train 4096 "
        "--synthetic-test 512"
    )
)
#: A tiny network for CPU. Width 24 (not 8): on CPU the memory check compares parameters,
#: gradients, optimizer state and buffered batches, and at width 8 one stage's buffered
#: activations outweigh the whole network's state. Two loader workers, as on GPU by default.
CPU_FLAGS = tuple(
    shlex.split(
        "--dataset synthetic --model resnet-small --width 24 --batch-size 8 "
        "--synthetic-train 512 --synthetic-test 64 --workers 2"
    )
)
STEPS = {"cuda": 120, "cpu": 24}
#: Hard deadline of each kind of run, in seconds (the budget may cut it shorter).
DEADLINES = {
    "cuda": {"single": 180.0, "pipeline": 240.0, "killed": 150.0},
    "cpu": {"single": 90.0, "pipeline": 120.0, "killed": 100.0},
}


@dataclass(frozen=True)
class Setting:
    """The device the runs use and how they are launched."""

    device: str  # "cuda" or "cpu"
    gpus: int  # GPUs the ranks see (0 on CPU)
    steps: int  # --max-steps of the measured runs
    work: Path  # where the runs go
    budget_s: float  # for all the runs together
    started: float = field(default_factory=time.monotonic)

    @property
    def flags(self) -> tuple[str, ...]:
        model = CUDA_FLAGS if self.device == "cuda" else CPU_FLAGS
        return (*model, "--modules", str(STAGES), "--seed", str(SEED), "--eval-every", "0")

    def deadline(self, kind: str) -> float:
        """Seconds a run of ``kind`` may take: its own deadline, or what is left of the budget."""
        left = self.budget_s - (time.monotonic() - self.started)
        return min(DEADLINES[self.device][kind], left)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["OMP_NUM_THREADS"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the package picks CUDA whenever it sees one
            env["TRGL_STRICT_DEVICE_RULES"] = "1"  # refuse what NCCL would refuse on a GPU
        return env

    def measured(self, out: Path) -> list[str]:
        """Flags of the measured runs: checkpointed once, at their last step."""
        steps = str(self.steps)
        every = ["--log-every", "10" if self.device == "cuda" else "4"]
        return [
            *self.flags,
            *every,
            "--max-steps",
            steps,
            "--checkpoint-every",
            steps,
            "--out",
            str(out),
        ]

    def single(self, regime: str, out: Path) -> list[str]:
        """One process: ``python -m trgl_dist.train --regime REGIME ...``."""
        return [sys.executable, "-m", "trgl_dist.train", "--regime", regime, *self.measured(out)]

    def torchrun(self, args: list[str]) -> list[str]:
        """The pipeline: ``torchrun --standalone --nproc_per_node=4 -m trgl_dist.train ...``."""
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        return [*launcher, f"--nproc_per_node={STAGES}", "-m", "trgl_dist.train", *args]


def shown(command: list[str]) -> str:
    """A command as a person would type it (``torchrun`` for python -m torch.distributed.run)."""
    words = list(command)
    if words[:3] == [sys.executable, "-m", "torch.distributed.run"]:
        words = ["torchrun", *words[3:]]
    elif words and words[0] == sys.executable:
        words[0] = "python"
    return shlex.join(words)
