"""Check 7: SIGKILL rank 1 of a training pipeline; torchrun must fail fast and name it."""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import children
import psutil
from judge import Outcome
from setting import Setting, shown

from trgl_dist.metrics.records import TrainRecord, read_records

VICTIM = 1
EXIT_WITHIN_S = 40.0
#: After torchrun has exited, how long its processes may take to be gone.
GRACE_S = 5.0
NAMED = f"stage {VICTIM} (rank {VICTIM}) died"
#: Far more work than the run will get to do before the kill.
LONG_RUN = ("--max-steps", "1000000", "--log-every", "2")


@dataclass
class Kill:
    """When and whom the check killed."""

    at: float | None = None  # seconds after the launch
    pid: int | None = None
    step: int | None = None  # of the victim's first train record


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    """The worker of ``rank`` among the launcher's descendants (torchrun sets RANK)."""
    for proc in launcher.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if proc.environ().get("RANK") == str(rank) and "trgl_dist.train" in " ".join(
                proc.cmdline()
            ):
                return proc
    return None


def first_train_step(metrics: Path, stage: int) -> int | None:
    if not metrics.is_file():
        return None
    steps = [
        r.step for r in read_records(metrics) if isinstance(r, TrainRecord) and r.stage == stage
    ]
    return min(steps) if steps else None


def killer(out: Path, kill: Kill) -> children.During:
    """Polled during the run: SIGKILL the victim once its first train record is written."""

    def poll(launcher: psutil.Process, elapsed: float) -> bool:
        step = first_train_step(out / "metrics.jsonl", VICTIM)
        if step is None:
            return False
        victim = rank_process(launcher, VICTIM)
        if victim is None:
            return False
        victim.send_signal(signal.SIGKILL)
        kill.at, kill.pid, kill.step = elapsed, victim.pid, step
        return True

    return poll


def killed_rank(setting: Setting) -> Outcome:
    out = setting.work / "killed"
    command = setting.torchrun([*setting.flags, *LONG_RUN, "--out", str(out)])
    kill = Kill()
    deadline = setting.deadline("killed")
    if deadline <= 0:
        return Outcome("killed-rank", False, "no time left in the budget")
    started = time.monotonic()
    run = children.run(
        "killed-rank run",
        command,
        log=setting.work / "killed.log",
        env=setting.env(),
        cwd=setting.work,
        deadline_s=deadline,
        during=killer(out, kill),
        grace_s=GRACE_S,
    )
    numbers = {
        "command": shown(command),
        "killed_pid": kill.pid,
        "killed_at_s": kill.at,
        "victim_first_step": kill.step,
        "exit_code": run.code,
        "processes_seen": len(run.seen),
        "survivors": run.survivors,
        "wall_s": time.monotonic() - started,
    }
    if kill.at is None:
        why = f"rank {VICTIM} never wrote a train record ({run.why()})"
        return Outcome("killed-rank", False, why, numbers)
    return _verdict(run, kill, numbers)


def _verdict(run: children.Finished, kill: Kill, numbers: dict) -> Outcome:
    assert kill.at is not None
    if run.code is None:
        why = f"torchrun still running {run.seconds - kill.at:.0f} s after the kill; killed"
        return Outcome("killed-rank", False, why, numbers)
    after = run.seconds - kill.at
    numbers["exit_after_kill_s"] = after
    named = NAMED in run.output()
    numbers["named"] = named
    text = (
        f"SIGKILL rank {VICTIM} (pid {kill.pid}) after its step {kill.step}; torchrun "
        f"exited {run.code} {after:.1f} s later"
    )
    problems = []
    if run.code == 0:
        problems.append("exit code 0")
    if after > EXIT_WITHIN_S:
        problems.append(f"exit took longer than {EXIT_WITHIN_S:.0f} s")
    if not named:
        problems.append(f"no '{NAMED}' in its output")
    if run.survivors:
        problems.append(f"{len(run.survivors)} process(es) survived: {run.survivors}")
    if problems:
        return Outcome("killed-rank", False, f"{text}; {'; '.join(problems)}", numbers)
    text += (
        f", printed '{NAMED}', none of its {len(run.seen)} processes survived "
        f"(checked up to {GRACE_S:.0f} s after its exit)"
    )
    return Outcome("killed-rank", True, text, numbers)
