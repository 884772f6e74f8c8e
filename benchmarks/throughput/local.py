"""In-process timings: E2E and the lock-step `parallel` regime (stages: standalone.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Setting, batches, build, timed_steps, write_json  # noqa: E402

from trgl_dist.training.learner import build_learners, chain, end_to_end  # noqa: E402

log = logging.getLogger("throughput.local")


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


def run_job(job: dict) -> dict:
    """One timing: {"mode": e2e|parallel, "threads": n, "setting": {...}}."""
    setting = Setting.from_json(json.dumps(job["setting"]))
    torch.set_num_threads(job.get("threads", 1))
    result = run_e2e(setting) if job["mode"] == "e2e" else run_parallel(setting)
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
