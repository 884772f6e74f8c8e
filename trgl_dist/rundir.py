"""The run directory: what it holds, and where a new run's goes (no torch here)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from trgl_dist.checkpoints.manifest import complete_steps
from trgl_dist.errors import ConfigError

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
TENSORBOARD_DIR = "tb"
TRACE_DIR = "trace"  # the ranks' span files
TRACE_FILE = "trace.json"  # merged: all ranks on one time axis


def run_directory(out: str, regime: str, resume: bool = False) -> Path:
    """The run directory, created; the default name holds the regime and the start time.
    A directory that already holds checkpoints is only reused by --resume."""
    path = Path(out or f"runs/{regime}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not resume and complete_steps(path):
        raise ConfigError(
            f"train.out: {path} already holds a run with checkpoints: "
            f"continue it with --resume {path}, or choose another --out"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"train.out: cannot write in run directory {path}: {err.strerror}"
        ) from None
    return path
