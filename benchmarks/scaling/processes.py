"""Starting one experiment's processes: a deadline, a log file, and nothing left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from benchenv import REPO, child_environment

HERE = Path(__file__).resolve().parent
#: Seconds a process group gets between SIGTERM and SIGKILL.
GRACE_S = 10.0
#: Lines of a failed command's log shown in the error.
TAIL_LINES = 40


def run(command: list[str], log_file: Path, timeout_s: float, threads: int | None) -> None:
    """Run ``command`` in a session of its own, its output into ``log_file``. On a
    deadline, an error or an interrupt that session gets SIGTERM (torchrun passes it on to
    its workers, which run in sessions of their own), then SIGKILL; a rank whose launcher
    is gone exits by itself (its watchdog), so no rank outlives its experiment."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w", encoding="utf-8") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        child = subprocess.Popen(
            command, cwd=REPO, env=child_environment(threads), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            code = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(child)
            raise RuntimeError(f"timed out after {timeout_s:.0f} s; log: {log_file}") from None
        except BaseException:
            _stop(child)
            raise
        finally:
            _stop_stragglers(child)
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... exited {code}:\n{tail(log_file)}")


def _stop(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the child's session (torchrun passes it on), SIGKILL after the grace."""
    _signal_group(child.pid, signal.SIGTERM)
    try:
        child.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(child.pid, signal.SIGKILL)
        child.wait()


def _stop_stragglers(child: subprocess.Popen[bytes]) -> None:
    """Processes of the child's session still running after it exited (a worker torchrun
    lost track of): killed, so the next experiment has the cores to itself."""
    _signal_group(child.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the session is gone
        os.killpg(pgid, sig)


def tail(log_file: Path, lines: int = TAIL_LINES) -> str:
    try:
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
