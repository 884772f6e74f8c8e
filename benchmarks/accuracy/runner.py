"""Execute one run: in this process through `trgl_dist.train.main`, or under torchrun.

Every run is the package's CLI as it is, with flags only (``experiments.train_flags``):
nothing of the package is replaced.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from experiments import Preset, RunSpec, train_flags

log = logging.getLogger("accuracy")
REPO = Path(__file__).resolve().parents[2]
PIPELINE_TIMEOUT_S = 1800


def package_version() -> dict[str, Any]:
    """The commit the runs were made with, and whether trgl_dist had uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "package_changes": git("status", "--porcelain", "trgl_dist").splitlines(),
    }


def _train_in_process(flags: list[str]) -> int:
    from trgl_dist.train import main

    quiet = io.StringIO()  # the console report: summary.json has the same numbers
    with contextlib.redirect_stdout(quiet):
        return main(flags)


def _train_subprocess(flags: list[str], ranks: int, run_dir: Path) -> int:
    """A fresh process (torchrun when ranks > 1): the pipeline check compares two runs of
    the package as it is on disk at the same moment, whatever this process imported."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [sys.executable, *(launcher if ranks > 1 else []), "-m", "trgl_dist.train", *flags]
    path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "w", encoding="utf-8") as out:
        done = subprocess.run(
            command,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=PIPELINE_TIMEOUT_S,
            check=False,
        )
    return done.returncode


def _result(spec: RunSpec, summary: dict[str, Any], seconds: float) -> dict[str, Any]:
    modules = [m["test_accuracy"] for m in summary["modules"]]
    last = summary["last_module_accuracy"]
    best = summary["best_module_accuracy"]
    if spec.method == "e2e":  # only the last head is trained and scored
        modules, best = [None] * (len(modules) - 1) + [last], last
    return {
        "id": spec.run_id,
        **spec.__dict__,
        "status": "ok",
        "module_accuracy": modules,
        "last_module_accuracy": last,
        "best_module_accuracy": best,
        "best_module": len(modules) - 1 if spec.method == "e2e" else summary["best_module"],
        "samples_per_s": summary.get("samples_per_s"),
        "seconds": seconds,
    }


def execute(preset: Preset, spec: RunSpec, work_dir: Path) -> dict[str, Any]:
    """Train one run into work_dir/<id>/ and return its result record (status ok or failed)."""
    run_dir = work_dir / spec.run_id
    flags = [*train_flags(preset, spec), "--out", str(run_dir)]
    started = time.perf_counter()
    if spec.regime == "pipeline":
        code = _train_subprocess(flags, preset.pipeline_ranks, run_dir)
    elif spec.phase == "pipeline":
        code = _train_subprocess(flags, 1, run_dir)
    else:
        try:
            code = _train_in_process(flags)
        except Exception:  # one broken run is recorded as failed; the study goes on
            log.exception("run %s raised", spec.run_id)
            code = -1
    seconds = time.perf_counter() - started
    summary_path = run_dir / "summary.json"
    if code != 0 or not summary_path.is_file():
        log.error("run %s failed (exit %s); see %s", spec.run_id, code, run_dir)
        return {"id": spec.run_id, **spec.__dict__, "status": "failed", "exit_code": code}
    summary = json.loads(summary_path.read_text())
    if summary.get("failure"):
        log.error("run %s failed: %s", spec.run_id, summary["failure"].get("description"))
        return {"id": spec.run_id, **spec.__dict__, "status": "failed", "exit_code": code}
    return _result(spec, summary, seconds)
