"""What the one-process regimes share: the context they run in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trgl_dist.config import Config
from trgl_dist.training.learner import ModuleLearner
from trgl_dist.training.schedule import DataFeed
from trgl_dist.training.snapshot import SaveCheckpoint
from trgl_dist.training.stage import Send


@dataclass
class Context:
    """Everything a regime needs; records go to ``record`` (the run log)."""

    config: Config
    learners: list[ModuleLearner]
    feed: DataFeed  # the training and test batches
    device: torch.device
    record: Send
    save: SaveCheckpoint = lambda step, position: None
    start_step: int = 0  # resumed: the checkpoint's step
    position: dict[str, Any] = field(default_factory=dict)  # resumed: beyond the step

    def out_of_steps(self, learner: ModuleLearner) -> bool:
        return 0 < self.config.train.max_steps <= learner.steps
