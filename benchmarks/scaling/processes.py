"""Starting one experiment's processes: a deadline, a log file, and nothing left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: Seconds a process group gets between SIGTERM and SIGKILL.
GRACE_S = 10.0
#: Lines of a failed command's log shown in the error.
TAIL_LINES = 40


def environment(threads: int | None) -> dict[str, str]:
    """The package importable from the checkout; ``threads`` per process, or None for
    torch's default (one per core), with every thread-count variable removed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    if threads is not None:
        # torchrun's own default, made explicit: one thread per rank whatever the shell says.
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def usable_cores() -> int:
    """The cores this process (and the experiments it starts) may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def torchrun(nproc: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}",
    ]  # fmt: skip


def run(command: list[str], log_file: Path, timeout_s: float, threads: int | None) -> None:
    """Run ``command`` in a session of its own, its output into ``log_file``. On a
    deadline, an error or an interrupt the whole session is stopped (torchrun's workers
    and the coordinator they start are in it), so no rank outlives its experiment."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w", encoding="utf-8") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        child = subprocess.Popen(
            command, cwd=REPO, env=environment(threads), stdout=out, stderr=subprocess.STDOUT,
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
