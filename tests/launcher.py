"""Runs the real `torchrun ... -m trgl_dist.train` as a subprocess, with a hard deadline."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@dataclass
class Launch:
    """A finished launch: exit code, output, every process it started, and how long it took."""

    code: int
    output: str
    seen: set[int] = field(default_factory=set)  # pids of every descendant ever observed
    seconds: float = 0.0

    def survivors(self) -> list[psutil.Process]:
        alive = []
        for pid in self.seen:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        return alive


def torchrun(
    nproc: int,
    args: list[str],
    *,
    deadline_s: float = 240,
    during: Callable[[psutil.Process, float], bool] | None = None,
) -> Launch:
    """Run torchrun with ``args``; ``during(process, elapsed)`` is polled until it returns True
    (e.g. to kill a rank). The whole process group is killed at the deadline and at the end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [*TORCHRUN, f"--nproc_per_node={nproc}", "-m", "trgl_dist.train", *args]
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=Path(__file__).parent.parent)
    launcher = psutil.Process(proc.pid)
    seen: set[int] = set()
    done = during is None
    try:
        while proc.poll() is None and time.monotonic() - started < deadline_s:
            seen |= {p.pid for p in _descendants(launcher)}
            if not done:
                done = bool(during(launcher, time.monotonic() - started))  # type: ignore[misc]
            time.sleep(0.1)
        if proc.poll() is None:
            raise TimeoutError(f"torchrun still running after {deadline_s} s")
        output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        return Launch(proc.returncode, output, seen, time.monotonic() - started)
    finally:
        _kill_all(proc, seen)


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_all(proc: subprocess.Popen, seen: set[int]) -> None:
    for pid in seen | {proc.pid}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    """The worker process of ``rank`` (torchrun sets RANK in its environment)."""
    for child in _descendants(launcher):
        try:
            if child.environ().get("RANK") == str(rank) and "trgl_dist.train" in " ".join(
                child.cmdline()
            ):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None
