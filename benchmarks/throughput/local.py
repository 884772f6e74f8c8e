"""In-process timings: E2E, the lock-step `parallel` regime, and each stage's standalone step."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Setting,
    batches,
    build,
    learners_of,
    median_step_seconds,
    timed_steps,
    write_json,
)

from trgl_dist.method import local_loss  # noqa: E402
from trgl_dist.training.learner import build_optimizer  # noqa: E402
from trgl_dist.training.stage import stage_modules  # noqa: E402

log = logging.getLogger("throughput.local")
STAGE_WARMUP = 2
STAGE_REPEATS = 5


def run_e2e(setting: Setting) -> dict:
    """Back-propagation through every body and the last head: the e2e regime's step."""
    config, modules, train_set = build(setting, "e2e")
    params = [p for m in modules for p in m.body.parameters()] + list(modules[-1].head.parameters())
    optimizer = build_optimizer(params, config)
    for module in modules:
        module.train()

    def step(x: Tensor, y: Tensor) -> None:
        h = x
        residues: list[Tensor] = []
        for module in modules:
            h, block_residues = module.features(h)
            residues += block_residues
        loss = local_loss(
            modules[-1].head(h),
            y,
            residues,
            method="vanilla",
            label_smoothing=config.method.label_smoothing,
            transport_norm=config.method.transport_norm,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()

    return timed_steps(step, batches(config, train_set), setting)


def run_parallel(setting: Setting) -> dict:
    """Each module's ModuleLearner.train_step in turn on the same batch: the parallel regime."""
    config, modules, train_set = build(setting, "parallel")
    learners = learners_of(config, modules)

    def step(x: Tensor, y: Tensor) -> None:
        h = x
        for learner in learners:
            h = learner.train_step(h, y)

    return timed_steps(step, batches(config, train_set), setting)


def run_stages(setting: Setting, stages: int) -> dict:
    """Median train-step seconds of each stage's modules alone, on that stage's real input."""
    config, modules, train_set = build(setting, "parallel")
    learners = learners_of(config, modules)
    x, y = next(batches(config, train_set))
    seconds = []
    for stage in range(stages):
        mine = [learners[k] for k in stage_modules(len(learners), stages, stage)]
        with torch.no_grad():  # this stage's input: the earlier modules' output
            h = x
            for learner in learners[: mine[0].index]:
                h, _ = learner.module.features(h)

        def step(h: Tensor = h, mine: list = mine) -> None:
            out = h
            for learner in mine:
                out = learner.train_step(out, y)

        seconds.append(median_step_seconds(step, STAGE_WARMUP, STAGE_REPEATS))
    return {"stage_step_s": seconds}


def run_job(job: dict) -> dict:
    """One timing: {"mode": e2e|parallel|stages, "threads": n, "stages": K, "setting": {...}}."""
    setting = Setting.from_json(json.dumps(job["setting"]))
    torch.set_num_threads(job.get("threads", 1))
    if job["mode"] == "e2e":
        result = run_e2e(setting)
    elif job["mode"] == "parallel":
        result = run_parallel(setting)
    else:
        result = run_stages(setting, job["stages"])
    result["threads"] = job.get("threads", 1)
    log.info("%s: %s", job["name"], result)
    return result


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=json.loads, required=True, help="JSON list of timings")
    parser.add_argument("--out", type=Path, required=True, help="JSON result file")
    args = parser.parse_args()
    write_json(args.out, {job["name"]: run_job(job) for job in args.jobs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
