"""A one-process run: build, restore, train by the regime, close the run directory."""

from __future__ import annotations

import logging
import time

import torch

from trgl_dist.config import Config, write_toml
from trgl_dist.data import build_datasets
from trgl_dist.metrics.closing import close_run
from trgl_dist.metrics.progress import ProgressLine
from trgl_dist.metrics.records import Record
from trgl_dist.metrics.runlog import RunLog
from trgl_dist.regimes import RUNNERS, Context
from trgl_dist.rundir import CONFIG_FILE, run_directory
from trgl_dist.training.build import build_network, resolve_split
from trgl_dist.training.learner import build_learners
from trgl_dist.training.schedule import DataFeed
from trgl_dist.training.snapshot import Resume, restore, run_meta, single_process_saver

log = logging.getLogger("trgl_dist")
PROGRESS_INTERVAL_S = 5.0


class LocalSink:
    """Where a one-process run's records go: the run log, and the same progress line a
    pipeline's coordinator shows."""

    def __init__(self, runlog: RunLog, num_modules: int) -> None:
        self.runlog = runlog
        self.progress = ProgressLine(num_modules, PROGRESS_INTERVAL_S)

    def __call__(self, rec: Record) -> None:
        self.runlog.record(rec)
        self.progress.observe(rec)
        self.progress.maybe_log(time.monotonic())


def device_for_single_process() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_single_process(config: Config, resume: Resume | None = None) -> int:
    """e2e, parallel, sequential or multilap in this process (``resume``: from a complete
    checkpoint of the run)."""
    torch.manual_seed(config.train.seed)
    train_set, test_set, spec = build_datasets(config.data, config.train.seed)
    device = device_for_single_process()
    config = resolve_split(config, spec, device)
    modules, counts = build_network(config, spec)
    for module in modules:
        module.to(device)
    learners = build_learners(config, modules)
    run_dir = run_directory(config.train.out, config.train.regime, resume is not None)
    meta = run_meta(config, counts, spec)
    start_step, position = (
        restore(run_dir, learners, meta, resume.step) if resume is not None else (0, {})
    )
    write_toml(config, run_dir / CONFIG_FILE)
    log.info(
        "%s: %s, %d modules of %s blocks, %s on %s, %d training samples -> %s",
        config.train.regime,
        config.model.name,
        len(modules),
        counts,
        config.method.name,
        device,
        len(train_set),
        run_dir,
    )
    runlog = RunLog(run_dir, append=resume is not None)
    save = single_process_saver(run_dir, learners, meta, config.train.keep_checkpoints)
    ctx = Context(
        config,
        learners,
        DataFeed(config, train_set, test_set, device),
        device,
        LocalSink(runlog, len(modules)),
        save=save,
        start_step=start_step,
        position=position,
    )
    try:
        RUNNERS[config.train.regime](ctx)
    finally:
        runlog.close()
    close_run(
        run_dir,
        regime=config.train.regime,
        num_modules=len(modules),
        extra={"blocks_per_module": counts},
    )
    print(f"run directory: {run_dir}")
    return 0
