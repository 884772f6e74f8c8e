"""Paired, interleaved step timings of VanGL and TRGL learners on identical modules."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from benchenv import NetworkSetting
from torch import Tensor

from trgl_dist.method import local_loss
from trgl_dist.training.build import build_network
from trgl_dist.training.learner import LossFn, ModuleLearner, build_learners

METHODS = ("vanilla", "trgl")


@dataclass(frozen=True)
class Setting(NetworkSetting):
    """Model, input and work of one comparison (same for both methods)."""

    warmup: int = 2  # untimed steps per method
    steps: int = 15  # timed steps per method
    seed: int = 0


def build_pair(
    setting: Setting, modules: int, loss: LossFn = local_loss
) -> dict[str, list[ModuleLearner]]:
    """Learners of both methods on copies of the same initial modules (trgl_dist's build),
    training with the local objective ``loss`` (the package's ``local_loss`` by default)."""
    torch.manual_seed(setting.seed)
    mods, _ = build_network(setting.config(modules, "trgl"), setting.spec)
    out = {}
    for method in METHODS:
        out[method] = build_learners(setting.config(modules, method), copy.deepcopy(mods))
        for learner in out[method]:
            learner.loss_fn = loss
    return out


def timed_step(learners: list[ModuleLearner], x: Tensor, y: Tensor) -> list[float]:
    """One lock-step batch (``trgl_dist.training.learner.chain``, the `parallel` regime's
    step), timed module by module: seconds of each module's train_step."""
    seconds = []
    h = x
    for learner in learners:
        started = time.perf_counter()
        h = learner.train_step(h, y)
        seconds.append(time.perf_counter() - started)
    return seconds


def interleaved(
    pair: dict[str, list[ModuleLearner]], setting: Setting
) -> dict[str, list[list[float]]]:
    """Per method, per timed step, per module seconds. The order of the two methods
    alternates every step so drift and cache effects fall on both alike."""
    s = setting.spec
    g = torch.Generator().manual_seed(setting.seed)
    x = torch.randn(setting.batch_size, s.channels, s.size, s.size, generator=g)
    y = torch.randint(0, s.num_classes, (setting.batch_size,), generator=g)
    times: dict[str, list[list[float]]] = {m: [] for m in METHODS}
    for step in range(setting.warmup + setting.steps):
        order = METHODS if step % 2 == 0 else METHODS[::-1]
        for method in order:
            seconds = timed_step(pair[method], x, y)
            if step >= setting.warmup:
                times[method].append(seconds)
    return times


def summarize(times: dict[str, list[list[float]]]) -> dict[str, Any]:
    """Median step times, their ratio, the median of the paired per-step ratios, per module."""
    totals = {m: [sum(step) for step in times[m]] for m in METHODS}
    median = {m: statistics.median(totals[m]) for m in METHODS}
    paired = [t / v for t, v in zip(totals["trgl"], totals["vanilla"])]
    modules = len(times["vanilla"][0])
    per_module = [
        statistics.median(s[k] for s in times["trgl"])
        / statistics.median(s[k] for s in times["vanilla"])
        for k in range(modules)
    ]
    return {
        "median_step_s": median,
        "ratio": median["trgl"] / median["vanilla"],
        "paired_ratio_median": statistics.median(paired),
        "paired_ratio_min": min(paired),
        "paired_ratio_max": max(paired),
        "per_module_ratio": per_module,
        "steps": len(paired),
    }


def compare(setting: Setting, modules: int, loss: LossFn = local_loss) -> dict[str, Any]:
    """VanGL vs TRGL on one model and K, one thread, warm, interleaved, with ``loss``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = summarize(interleaved(build_pair(setting, modules, loss), setting))
    finally:
        torch.set_num_threads(threads)
    return {"modules": modules, **result}
