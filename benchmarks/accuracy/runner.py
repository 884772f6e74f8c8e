"""Execute one run: in this process through `trgl_dist.train.main`, or under torchrun."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
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


def _is_final(ctx: Any, epoch: int, upto: int | None) -> bool:
    """True for the one evaluation a run needs: after the last epoch of the last module.

    A module-wise network is scored once at the end: in sequential and multilap a module
    is frozen after its last epoch, so its accuracy then equals its accuracy at the end.
    """
    from trgl_dist.config import module_epochs

    train = ctx.config.train
    if train.regime in ("sequential", "multilap"):
        last = len(ctx.learners)
        return upto == last and epoch + 1 == module_epochs(train, last)[-1]
    return epoch + 1 == train.epochs


@contextlib.contextmanager
def final_evaluation_only() -> Iterator[None]:
    """Skip the per-epoch test-set scoring except the final one (the 10,000 test images
    through 16 modules cost more than an epoch of 600 training samples). The final
    evaluation scores every module, as the unpatched code does after its last epoch."""
    from trgl_dist.regimes import common, e2e, parallel, sequential

    scoring = common.evaluate

    def evaluate(ctx: Any, epoch: int, upto: int | None = None, only: Any = None) -> list[float]:
        if not _is_final(ctx, epoch, upto):
            return []
        if ctx.config.train.regime in ("sequential", "multilap"):
            return scoring(ctx, epoch)
        return scoring(ctx, epoch, upto, only)

    # Every regime module that calls evaluate through its own global name.
    patched = [m for m in (common, parallel, e2e, sequential) if hasattr(m, "evaluate")]
    originals = [m.evaluate for m in patched]
    for module in patched:
        module.evaluate = evaluate
    try:
        yield
    finally:
        for module, original in zip(patched, originals, strict=True):
            module.evaluate = original


@contextlib.contextmanager
def without_run_report() -> Iterator[None]:
    """No per-run report.md and PNGs (seconds of matplotlib per run); summary.json stays."""
    from trgl_dist import train

    original = train.write_report
    train.write_report = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        yield
    finally:
        train.write_report = original  # type: ignore[assignment]


def _train_in_process(flags: list[str], final_only: bool) -> int:
    from trgl_dist.train import main

    quiet = io.StringIO()  # the console report: summary.json has the same numbers
    with contextlib.redirect_stdout(quiet), without_run_report():
        if not final_only:
            return main(flags)
        with final_evaluation_only():
            return main(flags)


def _train_subprocess(flags: list[str], ranks: int, run_dir: Path) -> int:
    """A fresh process (torchrun when ranks > 1): the pipeline check compares two runs of
    the package as it is on disk at the same moment, whatever this process imported."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [sys.executable, *(launcher if ranks > 1 else []), "-m", "trgl_dist.train", *flags]
    path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
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
            code = _train_in_process(flags, spec.final_eval_only)
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
