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

from common import Setting, batches, build, timed_steps, write_json  # noqa: E402

from trgl_dist.network.split import median_seconds  # noqa: E402
from trgl_dist.training.learner import Trainer, build_learners, chain, end_to_end  # noqa: E402
from trgl_dist.training.stage import stage_modules  # noqa: E402

log = logging.getLogger("throughput.local")
STAGE_WARMUP = 2
STAGE_REPEATS = 5


def run_e2e(setting: Setting) -> dict:
    """Back-propagation through every body and the last head: the e2e regime's step
    (``end_to_end``, one optimizer shared by the learners)."""
    config, modules, train_set = build(setting, "e2e")
    step = end_to_end(build_learners(config, modules))
    return timed_steps(step, batches(config, train_set), setting)


def run_parallel(setting: Setting) -> dict:
    """Each module's ModuleLearner.train_step in turn on the same batch: the parallel
    regime's step (``chain``)."""
    config, modules, train_set = build(setting, "parallel")
    step = chain(build_learners(config, modules))
    return timed_steps(step, batches(config, train_set), setting)


def run_stages(setting: Setting, stages: int) -> dict:
    """Median train-step seconds of each stage's modules alone, on that stage's real input
    (``median_seconds`` of the package's equal-time profile, after STAGE_WARMUP steps)."""
    config, modules, train_set = build(setting, "parallel")
    learners = build_learners(config, modules)
    x, y = next(batches(config, train_set))
    seconds = []
    for stage in range(stages):
        mine = [learners[k] for k in stage_modules(len(learners), stages, stage)]
        with torch.no_grad():  # this stage's input: the earlier modules' output
            h = x
            for learner in learners[: mine[0].index]:
                h, _ = learner.module.features(h)
        train = chain(mine)

        def step(h: Tensor = h, train: Trainer = train) -> None:
            train(h, y)

        for _ in range(STAGE_WARMUP - 1):  # median_seconds warms up once more
            step()
        seconds.append(median_seconds(step, STAGE_REPEATS))
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
