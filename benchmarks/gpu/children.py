"""Child processes of the check: each with a hard deadline, its descendants tracked and killed."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

POLL_S = 0.1
#: torchrun's summary of the first failed worker: its rank, exit code and signal.
_ROOT_CAUSE = re.compile(
    r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*?(SIG[A-Z]+)?\)?\s*$",
    re.DOTALL | re.MULTILINE,
)
#: Polled while a child runs: (the child's psutil process, seconds since start) -> done.
During = Callable[[psutil.Process, float], bool]
_live: dict[int, Child] = {}  # pid -> every child not yet cleaned up


@dataclass
class Finished:
    """A child that ended: exit code (None: killed at its deadline), time, output, processes."""

    name: str
    command: list[str]
    code: int | None
    seconds: float
    log: Path
    seen: set[int] = field(default_factory=set)  # pids of every descendant ever observed
    survivors: list[int] = field(default_factory=list)  # of ``seen``, alive after the exit

    @property
    def ok(self) -> bool:
        return self.code == 0

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def why(self) -> str:
        """One line on how the child failed: its deadline, or its exit code and the package's
        own line about it (``error: ...``, ``trgl_dist: ...``), else torchrun's root cause,
        else its last line."""
        if self.code is None:
            return f"{self.name} still running at its deadline ({self.seconds:.0f} s); killed"
        output = self.output()
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        said = [line for line in lines if line.startswith(("error:", "trgl_dist:"))]
        cause = _ROOT_CAUSE.search(output)
        if said:
            last = said[-1]
        elif cause:
            last = f"rank {cause.group(1)} exited {cause.group(2)} {cause.group(3) or ''}".strip()
            last += "".join(f"; {line}" for line in lines if line.startswith("terminate called"))
        else:
            last = (lines or ["no output"])[-1]
        return f"{self.name} exited {self.code} after {self.seconds:.0f} s: {last[:300]}"


class Child:
    """One command in its own session, output to a log file (no pipe to fill up)."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict[str, str], cwd: Path):
        self.name, self.command, self.log = name, command, log
        self.seen: set[int] = set()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self.process = psutil.Process(self.proc.pid)
        _live[self.proc.pid] = self

    def track(self) -> None:
        """Remember every descendant alive now (torchrun's workers run in their own sessions,
        so only the process tree finds them all)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self.seen |= {p.pid for p in self.process.children(recursive=True)}

    def kill_all(self) -> None:
        """SIGKILL the child and every descendant seen, then reap the child."""
        self.track()
        for pid in self.seen | {self.proc.pid}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        _live.pop(self.proc.pid, None)


def run(
    name: str,
    command: list[str],
    *,
    log: Path,
    env: dict[str, str],
    cwd: Path,
    deadline_s: float,
    during: During | None = None,
    grace_s: float = 0.0,
) -> Finished:
    """Run ``command`` until it exits or ``deadline_s`` passes; ``during`` is polled until it
    returns True. Once it has exited, the processes it started still alive after up to
    ``grace_s`` are its survivors. Every process it started is killed before this returns."""
    child = Child(name, command, log, env, cwd)
    started = time.monotonic()
    done = during is None
    try:
        while child.proc.poll() is None and time.monotonic() - started < deadline_s:
            child.track()
            if not done and during is not None:
                done = during(child.process, time.monotonic() - started)
            time.sleep(POLL_S)
        seconds = time.monotonic() - started
        child.track()
        code = child.proc.poll()
        alive = survivors(child.seen)
        while alive and code is not None and time.monotonic() - started < seconds + grace_s:
            time.sleep(POLL_S)
            alive = survivors(child.seen)
        return Finished(name, command, code, seconds, log, set(child.seen), alive)
    finally:
        child.kill_all()


def survivors(pids: set[int]) -> list[int]:
    """The pids still running (zombies, which only wait to be reaped, do not count)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return sorted(alive)


def kill_everything() -> None:
    """Kill every child still alive (the script is ending, whatever the reason)."""
    for child in list(_live.values()):
        child.kill_all()
