"""The metrics coordinator: a spawned process that gathers stage records and writes the run."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import zmq

from trgl_dist.metrics.client import DEFAULT_MAX_MESSAGE_BYTES
from trgl_dist.metrics.collector import Collector
from trgl_dist.metrics.runlog import (
    RunLog,
)

logger = logging.getLogger(__name__)

_WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]", "::")


class CoordinatorError(RuntimeError):
    """The coordinator could not start (e.g. its port is taken)."""


@dataclass(frozen=True)
class CoordinatorSettings:
    """Timing and limits of the coordinator; the defaults suit a real run."""

    grace_s: float = 2.0  # after the first error, wait this long for the other stages' reports
    idle_timeout_s: float | None = None  # give up when no record arrives this long (None: never)
    progress_interval_s: float = 5.0
    parent_poll_s: float = 0.5
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    receive_hwm: int = 100_000
    startup_timeout_s: float = 120.0
    tensorboard: bool = True


def _connect_address(endpoint: str, connect_host: str | None) -> str:
    """What clients connect to: a wildcard bind is reached through connect_host (or loopback)."""
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if host in _WILDCARD_HOSTS:
        host = connect_host or "127.0.0.1"
    return f"{scheme}://{host}:{port}"


def start_coordinator(
    run_dir: Path,
    *,
    world_size: int,
    num_modules: int,
    regime: str,
    bind: str = "tcp://127.0.0.1:0",
    append: bool = False,
    settings: CoordinatorSettings | None = None,
    connect_host: str | None = None,
    extra: dict[str, Any] | None = None,
    checkpoints: dict[str, Any] | None = None,
) -> tuple[BaseProcess, str]:
    """Spawn the coordinator; return it and the address MetricsClients connect to.

    ``extra`` (JSON values) is added to summary.json; ``connect_host`` is the address
    other nodes reach this one by, used when ``bind`` is a wildcard (tcp://0.0.0.0:PORT).
    """
    settings = settings or CoordinatorSettings()
    context = multiprocessing.get_context("spawn")
    ready_recv, ready_send = context.Pipe(duplex=False)
    process = context.Process(
        target=_process_main,
        name="trgl-coordinator",
        # Daemon: a parent that exits without joining takes it down (SIGTERM -> flush, exit).
        daemon=True,
        kwargs=dict(
            run_dir=Path(run_dir),
            world_size=world_size,
            num_modules=num_modules,
            regime=regime,
            bind=bind,
            append=append,
            settings=settings,
            parent_pid=os.getpid(),
            ready=ready_send,
            extra=extra,
            checkpoints=checkpoints,
        ),
    )
    process.start()
    ready_send.close()
    try:
        endpoint = _await_ready(process, ready_recv, settings.startup_timeout_s)
    finally:
        ready_recv.close()
    return process, _connect_address(endpoint, connect_host)


def _await_ready(process: BaseProcess, ready: Connection, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while not ready.poll(0.1):
        if not process.is_alive() and not ready.poll(0):
            raise CoordinatorError(f"metrics coordinator exited at start (code {process.exitcode})")
        if time.monotonic() > deadline:
            stop_coordinator(process, timeout_s=0)
            raise CoordinatorError(f"metrics coordinator did not start within {timeout_s:.0f} s")
    try:
        status, detail = ready.recv()
    except EOFError:  # poll() is also true when the child died and closed its end
        process.join(5)
        raise CoordinatorError(
            f"metrics coordinator exited at start (code {process.exitcode})"
        ) from None
    if status != "ready":
        stop_coordinator(process, timeout_s=5)
        raise CoordinatorError(detail)
    return str(detail)


def stop_coordinator(process: BaseProcess, timeout_s: float = 60.0) -> int | None:
    """Wait for the coordinator to finish; terminate, then kill, if it overstays."""
    process.join(timeout_s)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)
    return process.exitcode


def _process_main(**kwargs: Any) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s [coordinator] %(message)s", datefmt="%H:%M:%S"
    )
    sys.exit(run_coordinator(**kwargs))


def _bind_pull(context: zmq.Context[Any], bind: str, settings: CoordinatorSettings) -> Any:
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, settings.receive_hwm)
    # libzmq drops (and disconnects) a sender of a bigger message before it reaches us.
    sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(bind)
    return sock


def run_coordinator(
    run_dir: Path,
    *,
    world_size: int,
    num_modules: int,
    regime: str,
    bind: str,
    append: bool = False,
    settings: CoordinatorSettings | None = None,
    parent_pid: int | None = None,
    ready: Connection | None = None,
    extra: dict[str, Any] | None = None,
    checkpoints: dict[str, Any] | None = None,
) -> int:
    """The coordinator's body; returns the exit code (0 done, 1 failed, 2 no bind, 128+sig)."""
    settings = settings or CoordinatorSettings()
    context: zmq.Context[Any] = zmq.Context()
    try:
        try:
            sock = _bind_pull(context, bind, settings)
        except zmq.ZMQError as exc:
            if ready is not None:
                ready.send(("error", f"metrics coordinator cannot bind {bind}: {exc.strerror}"))
            return 2
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if ready is not None:
            ready.send(("ready", endpoint))
            ready.close()
        logger.info("collecting metrics on %s into %s", endpoint, run_dir)
        runlog = RunLog(run_dir, append=append, tensorboard=settings.tensorboard)
        state = Collector(runlog, sock, world_size, num_modules, regime, settings, parent_pid)
        state.extra = dict(extra or {})
        state.checkpoints = checkpoints
        return state.run()
    finally:
        context.destroy(linger=0)
