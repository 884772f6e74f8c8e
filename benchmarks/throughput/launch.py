"""Starting one experiment: a subprocess with a deadline and the package on its path."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchenv import child_environment, torchrun
from common import Setting

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
log = logging.getLogger("throughput")


def run_command(command: list[str], threads: int, timeout: float) -> None:
    """Run ``command``; its output is kept and shown only when it fails."""
    log.info("$ %s", " ".join(command))
    done = subprocess.run(
        command,
        cwd=REPO,
        env=child_environment(threads),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:6])}... exited {done.returncode}:\n{done.stderr[-3000:]}"
        )


def local(jobs: list[dict[str, Any]], out: Path, timeout: float) -> dict:
    """In-process timings of local.py, in one process (each job sets its thread count)."""
    command = [sys.executable, str(HERE / "local.py"), "--jobs", json.dumps(jobs)]
    run_command([*command, "--out", str(out)], 1, timeout)
    return json.loads(out.read_text())


def gpipe(
    setting: Setting, runs: list[tuple[str, int]], out: Path, timeout: float
) -> list[dict[str, Any]]:
    """Experiment (d) under torchrun, one rank per stage, every schedule in one launch."""
    command = [*torchrun(setting.modules), str(HERE / "gpipe.py"), "--setting", setting.to_json()]
    command += ["--runs", ",".join(f"{s}:{m}" for s, m in runs), "--out", str(out)]
    run_command(command, 1, timeout)
    return json.loads(out.read_text())["runs"]


def pipeline(setting: Setting, run_dir: Path, timeout: float) -> Path:
    """Experiment (c): the real CLI under torchrun; returns the run directory."""
    command = [*torchrun(setting.modules), "-m", "trgl_dist.train", *setting.flags()]
    command += ["--out", str(run_dir)]
    run_command(command, 1, timeout)
    return run_dir
