"""Small builders shared by the tests: a config, modules and learners on synthetic data."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import torch

from trgl_dist.config import Config
from trgl_dist.data import build_datasets
from trgl_dist.regimes import Context
from trgl_dist.training.build import build_network
from trgl_dist.training.learner import build_learners
from trgl_dist.training.schedule import DataFeed


def small_config(**sections: dict) -> Config:
    """resnet-small on 64 synthetic samples, batch 16; override per section."""
    config = Config()
    defaults = {
        "data": {
            "dataset": "synthetic",
            "synthetic_train": 64,
            "synthetic_test": 32,
            "batch_size": 16,
        },
        "model": {"name": "resnet-small", "modules": 3, "width": 8},
        "optim": {"lr": 0.05},
        "train": {"log_every": 2},
    }
    for section, values in defaults.items():
        config = config.replace(section, **{**values, **sections.pop(section, {})})
    for section, values in sections.items():
        config = config.replace(section, **values)
    return config


def make_context(config: Config, records: list | None = None) -> Context:
    torch.manual_seed(config.train.seed)
    train_set, test_set, spec = build_datasets(config.data, config.train.seed)
    modules, _ = build_network(config, spec)
    learners = build_learners(config, modules)
    sink = records if records is not None else []
    torch.manual_seed(config.train.seed + 1)
    feed = DataFeed(config, train_set, test_set)
    return Context(config, learners, feed, torch.device("cpu"), sink.append)


def parameters(ctx: Context) -> list[torch.Tensor]:
    return [p.detach().clone() for learner in ctx.learners for p in learner.module.parameters()]


def snapshot(module: torch.nn.Module) -> dict:
    return copy.deepcopy(module.state_dict())


REPO = Path(__file__).resolve().parents[1]


def run_script(script: Path, *flags: str, timeout_s: float) -> subprocess.CompletedProcess:
    """A benchmark script run as a user runs it, from the repository, with a hard deadline."""
    return subprocess.run(
        [sys.executable, str(script), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip
