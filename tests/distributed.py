"""The one multi-process test helper: Gloo workers on a file store, hard deadline, no stragglers."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch

from trgl_dist.runtime import topology as topo
from trgl_dist.runtime.planes import warm_links


@dataclass
class WorkerResult:
    """What became of one rank."""

    rank: int
    exitcode: int | None  # negative: killed by that signal (-9: SIGKILL)
    value: Any = None  # what fn returned (must be picklable)
    error: str = ""  # the traceback when fn raised
    timed_out: bool = False  # still alive at the deadline, then SIGKILLed


def kill_self() -> None:
    """SIGKILL the calling worker: a crash with no chance to clean up or say goodbye."""
    os.kill(os.getpid(), signal.SIGKILL)


def run_workers(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    deadline_s: float = 60.0,
    kill_rank: tuple[int, float] | None = None,
    replicas: tuple[int, ...] = (),
    **kw: Any,
) -> list[WorkerResult]:
    """Run ``fn(topology, *args, **kw)`` on ``world_size`` spawned Gloo ranks, laid out
    with ``replicas`` per stage (layout.py; default: one each).

    ``fn`` must be a module-level function. After ``deadline_s`` every survivor is
    SIGKILLed and reported ``timed_out``. ``kill_rank=(rank, after_s)`` SIGKILLs that
    rank ``after_s`` seconds after it joined the process group (so never mid start-up).
    """
    workdir = Path(tempfile.mkdtemp(prefix="trgl-workers-"))
    processes: list[BaseProcess] = []
    try:
        processes = _start(fn, world_size, replicas, args, kw, workdir)
        timed_out = _wait(processes, time.monotonic() + deadline_s, kill_rank, workdir)
        return [_result(r, p, workdir, r in timed_out) for r, p in enumerate(processes)]
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
        shutil.rmtree(workdir, ignore_errors=True)


def _start(
    fn: Callable[..., Any],
    world_size: int,
    replicas: tuple[int, ...],
    args: tuple,
    kw: dict,
    workdir: Path,
) -> list[BaseProcess]:
    context = multiprocessing.get_context("spawn")
    init_method = f"file://{workdir / 'store'}"
    processes: list[BaseProcess] = []
    for rank in range(world_size):
        process = context.Process(
            target=_worker_main,
            args=(fn, rank, world_size, replicas, init_method, workdir, args, kw),
            name=f"rank{rank}",
            daemon=False,  # a worker may start children of its own (the coordinator)
        )
        # The child inherits the environment at exec time: that is the only way
        # OMP_NUM_THREADS reaches OpenMP before torch is imported there.
        with _environment(RANK=rank, WORLD_SIZE=world_size, LOCAL_RANK=rank, OMP_NUM_THREADS=1):
            process.start()
        processes.append(process)
    return processes


@contextlib.contextmanager
def _environment(**values: object) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: str(value) for name, value in values.items()})
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _wait(
    processes: list[BaseProcess],
    deadline: float,
    kill_rank: tuple[int, float] | None,
    workdir: Path,
) -> set[int]:
    """Join every process until the deadline; returns the ranks that were still alive."""
    ready_at: float | None = None
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        if kill_rank is not None:
            rank, after_s = kill_rank
            if ready_at is None and _ready_path(workdir, rank).exists():
                ready_at = time.monotonic()
            if ready_at is not None and time.monotonic() - ready_at >= after_s:
                processes[rank].kill()
                kill_rank = None
        alive = next(p for p in processes if p.is_alive())
        alive.join(timeout=0.05)  # wake often enough to fire kill_rank on time
    timed_out = {rank for rank, p in enumerate(processes) if p.is_alive()}
    for rank in timed_out:
        processes[rank].kill()
    return timed_out


def _ready_path(workdir: Path, rank: int) -> Path:
    return workdir / f"ready{rank}"


def _result(rank: int, process: BaseProcess, workdir: Path, timed_out: bool) -> WorkerResult:
    process.join()
    result = WorkerResult(rank, process.exitcode, timed_out=timed_out)
    path = workdir / f"result{rank}.pkl"
    if path.exists():
        result.value, result.error = pickle.loads(path.read_bytes())
    return result


def _worker_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    replicas: tuple[int, ...],
    init_method: str,
    workdir: Path,
    args: tuple,
    kw: dict,
) -> None:
    torch.set_num_threads(1)
    value, error = None, ""
    try:
        topology = topo.init_distributed(
            link_timeout_s=120.0, init_method=init_method, replicas=replicas
        )
        warm_links(topology)  # as a pipeline rank does before its link threads start
        _ready_path(workdir, rank).touch()
        value = fn(topology, *args, **kw)
    except BaseException:  # noqa: BLE001 - the parent wants the text of any failure
        error = traceback.format_exc()
    _write_result(workdir / f"result{rank}.pkl", value, error)
    if error:
        # Skip interpreter teardown: link threads may still be blocked on a dead peer.
        os._exit(1)
    topo.shutdown()


def _write_result(path: Path, value: Any, error: str) -> None:
    try:
        payload = pickle.dumps((value, error))
    except Exception:  # noqa: BLE001 - an unpicklable value is a test bug worth naming
        payload = pickle.dumps(
            (None, error + "\nunpicklable return value:\n" + traceback.format_exc())
        )
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)  # atomic: a worker killed mid-write leaves no half result
