"""Entry point: parse -> build -> train -> report. `python -m trgl_dist.train` or under torchrun."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import torch

from trgl_dist import cli
from trgl_dist.checkpoints.manifest import CheckpointError
from trgl_dist.checkpoints.snapshot import restore, run_meta, single_process_saver
from trgl_dist.config import Config, ConfigError, write_toml
from trgl_dist.data import DataError, build_datasets
from trgl_dist.metrics.report import format_console_report, write_report
from trgl_dist.metrics.runlog import RunLog, read_metrics, run_directory, summarize, write_summary
from trgl_dist.network.build import build_network, resolve_split
from trgl_dist.regimes import RUNNERS, Context
from trgl_dist.training.learner import build_learners

log = logging.getLogger("trgl_dist")


def device_for_single_process() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_single_process(config: Config, resume: bool = False) -> int:
    """e2e, parallel, sequential or multilap in this process (``resume``: from the run's
    last complete checkpoint)."""
    torch.manual_seed(config.train.seed)
    train_set, test_set, spec = build_datasets(config.data, config.train.seed)
    config = resolve_split(config, spec)
    modules, counts = build_network(config, spec)
    device = device_for_single_process()
    for module in modules:
        module.to(device)
    learners = build_learners(config, modules)
    run_dir = run_directory(config, resume)
    meta = {
        **run_meta(config, counts, stages=1),
        "input": [spec.channels, spec.size, spec.size],
        "num_classes": spec.num_classes,
    }
    position = restore(run_dir, learners, meta, stage=0)[1] if resume else {}
    write_toml(config, run_dir / "config.toml")
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
    runlog = RunLog(run_dir, append=resume)
    save = single_process_saver(run_dir, learners, meta, config.train.keep_checkpoints)
    ctx = Context(
        config, learners, train_set, test_set, device, runlog.record, save=save, position=position
    )
    try:
        RUNNERS[config.train.regime](ctx)
    finally:
        runlog.close()
    records = read_metrics(run_dir / "metrics.jsonl")
    summary = summarize(
        records,
        regime=config.train.regime,
        num_modules=len(modules),
        extra={
            "blocks_per_module": counts,
            "samples_per_s": ctx.samples_seen / max(sum(ctx.epoch_times), 1e-9),
        },
    )
    write_summary(run_dir, summary)
    write_report(run_dir, records, summary)
    print(format_console_report(summary))
    print(f"run directory: {run_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        config, extras = cli.parse(argv)
        resume = extras.resume is not None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or config.train.regime == "pipeline":
            from trgl_dist.runtime.pipeline import run_pipeline

            return run_pipeline(config.replace("train", regime="pipeline"), resume=resume)
        return run_single_process(config, resume=resume)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"error: stopped, {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
