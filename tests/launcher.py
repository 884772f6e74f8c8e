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
from typing import Any

import psutil

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@dataclass
class Launch:
    """A finished launch: exit code, output, every process it started, and how long it took."""

    code: int
    output: str
    seen: set[int] = field(default_factory=set)  # pids of every descendant ever observed
    seconds: float = 0.0
    stream: Any = None  # the output pipe, still open when the launch was not cleaned up

    def kill_survivors(self) -> None:
        for proc in self.survivors():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()

    def read_rest(self) -> str:
        """The output so far plus what its orphaned processes wrote after the launcher died."""
        if self.stream is not None:
            self.output += self.stream.read().decode(errors="replace")
            self.stream = None
        return self.output

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
    kill_at_end: bool = True,
) -> Launch:
    """Run torchrun with ``args``; ``during(process, elapsed)`` is polled until it returns True
    (e.g. to kill a rank). Every process it started is killed at the deadline, and at the
    end unless ``kill_at_end`` is False (the test then checks they end by themselves)."""
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
        seen |= {p.pid for p in _descendants(launcher)}
        if not kill_at_end:
            return Launch(proc.returncode, "", seen, time.monotonic() - started, proc.stdout)
        output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        return Launch(proc.returncode, output, seen, time.monotonic() - started)
    except BaseException:
        kill_at_end = True
        raise
    finally:
        if kill_at_end:
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


def loading_torch(process: psutil.Process) -> bool:
    """Whether ``process`` has torch's library mapped: past the interpreter's own start-up
    (a signal there is Python's fatal error, before any code of ours runs), inside
    ``trgl_dist.train``, whose handlers are installed before it imports torch."""
    try:
        return any("libtorch" in Path(m.path).name for m in process.memory_maps())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def our_output(output: str) -> str:
    """The output without torchrun's own tracebacks (its ChildFailedError when a worker
    exits non-zero, its SignalException on Ctrl-C). Any other traceback stays."""
    lines, kept, skipping = output.splitlines(), [], False
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            block = lines[i : i + 12]
            skipping = any("torch/distributed/run.py" in ln for ln in block)
        if not skipping:
            kept.append(line)
        if skipping and line.startswith("torch.distributed.elastic."):
            skipping = False
    return "\n".join(kept)
