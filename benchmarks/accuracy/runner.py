"""Execute runs: `trgl_dist.train.main` with flags only (nothing patched), in a worker pool."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from experiments import Preset, RunSpec, train_flags

log = logging.getLogger("accuracy")
REPO = Path(__file__).resolve().parents[2]
INTERRUPTED = 130  # trgl_dist.train's exit code after Ctrl-C


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


def train_accuracy(run_dir: Path, modules: int) -> tuple[list[float | None], list[float]]:
    """Each module's training accuracy over the last epoch, and the last module's by epoch."""
    # With --log-every above the steps of a run, a module's train records are its epochs'.
    from trgl_dist.metrics.records import TrainRecord, read_records

    last: list[float | None] = [None] * modules
    curve: dict[int, float] = {}
    for r in read_records(run_dir / "metrics.jsonl"):
        if isinstance(r, TrainRecord):
            last[r.module] = r.accuracy
            if r.module == modules - 1:
                curve[r.epoch] = round(r.accuracy, 4)
    return last, [curve[e] for e in sorted(curve)]


def _result(spec: RunSpec, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    modules = [m["test_accuracy"] for m in summary["modules"]]
    last = summary["last_module_accuracy"]
    best, best_module = summary["best_module_accuracy"], summary["best_module"]
    train, curve = train_accuracy(run_dir, len(modules))
    if spec.method == "e2e":  # only the last head is trained and scored
        modules, best, best_module = [None] * (len(modules) - 1) + [last], last, len(modules) - 1
    return {
        "status": "ok",
        "module_accuracy": modules,
        "last_module_accuracy": last,
        "best_module_accuracy": best,
        "best_module": best_module,
        "train_accuracy": train,
        "last_train_accuracy": train[-1],
        "train_curve": curve,
        "samples_per_s": summary.get("samples_per_s"),
    }


def execute(preset: Preset, spec: RunSpec, work_dir: Path) -> dict[str, Any]:
    """Train one run into a fresh work_dir/<id>/; its record: ok, failed or interrupted."""
    from trgl_dist.train import main

    run_dir = work_dir / spec.run_id
    shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted attempt left
    flags = [*train_flags(preset, spec), "--out", str(run_dir)]
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the console report: in summary.json
            code = main(flags)
    except Exception:  # one broken run is recorded as failed; the study goes on
        log.exception("run %s raised", spec.run_id)
        code = -1
    record: dict[str, Any] = {"id": spec.run_id, **spec.record()}
    record["seconds"] = round(time.perf_counter() - started, 2)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if code == INTERRUPTED:
        return {**record, "status": "interrupted"}
    if code != 0 or not summary or summary.get("failure"):
        why = (summary.get("failure") or {}).get("description", f"exit {code}")
        log.error("run %s failed: %s (see %s)", spec.run_id, why, run_dir)
        return {**record, "status": "failed", "exit_code": code}
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # metrics.jsonl stays
    return {**record, **_result(spec, run_dir, summary)}


def _init_worker(threads: int) -> None:
    """One worker: it ends with the study's process (Linux), and uses ``threads`` threads."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):  # PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it ended before the prctl
        os._exit(1)
    import torch

    torch.set_num_threads(threads)


class Pool:
    """Spawned worker processes, each training one run at a time with ``threads`` threads."""

    def __init__(self, workers: int, threads: int) -> None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)  # read by the workers' OpenMP at start
        self.workers = workers
        self.executor = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads,),
        )
        self.running: dict[Future[dict[str, Any]], RunSpec] = {}

    def free(self) -> int:
        return self.workers - len(self.running)

    def busy(self, run_id: str) -> bool:
        return any(spec.run_id == run_id for spec in self.running.values())

    def submit(self, preset: Preset, spec: RunSpec, work_dir: Path) -> None:
        self.running[self.executor.submit(execute, preset, spec, work_dir)] = spec

    def finished(self) -> Iterator[dict[str, Any]]:
        """Wait until at least one run finishes; yield the records of those that did."""
        done, _ = wait(self.running, return_when=FIRST_COMPLETED)
        for future in done:
            del self.running[future]
            yield future.result()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
