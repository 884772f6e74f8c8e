"""The metrics coordinator: a spawned process that gathers stage records and writes the run."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import zmq

from trgl_dist.errors import CoordinatorError
from trgl_dist.metrics.collector import Collector, CoordinatorSettings, RunShape
from trgl_dist.metrics.runlog import RunLog

logger = logging.getLogger(__name__)

_WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]", "::")


def _connect_address(endpoint: str, connect_host: str | None) -> str:
    """What clients connect to: a wildcard bind is reached through connect_host (or loopback)."""
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if host in _WILDCARD_HOSTS:
        host = connect_host or "127.0.0.1"
    return f"{scheme}://{host}:{port}"


@dataclass(frozen=True)
class CoordinatorJob:
    """What one coordinator collects: where, for which run, and who may speak."""

    run_dir: Path
    shape: RunShape
    secret: bytes  # the run's signing key: only its ranks can send records
    bind: str = "tcp://127.0.0.1:0"
    append: bool = False  # a resumed run: append to metrics.jsonl
    extra: dict[str, Any] = field(default_factory=dict)  # added to summary.json (JSON values)
    # {"meta": ..., "keep": N}: write a step's manifest once every stage saved it
    checkpoints: dict[str, Any] | None = None


@dataclass(frozen=True)
class CoordinatorAddresses:
    """Where the ranks reach a running coordinator."""

    records: str  # MetricsClients PUSH records and heartbeats here
    watch: str  # the ranks' watchdogs SUBscribe here: alive, abort, done


def start_coordinator(
    job: CoordinatorJob,
    settings: CoordinatorSettings | None = None,
    connect_host: str | None = None,
) -> tuple[BaseProcess, CoordinatorAddresses]:
    """Spawn the coordinator; return it and the addresses the ranks connect to.

    ``connect_host`` is the address other nodes reach this one by, used when the job binds
    a wildcard (tcp://0.0.0.0:PORT).
    """
    settings = settings or CoordinatorSettings()
    context = multiprocessing.get_context("spawn")
    ready_recv, ready_send = context.Pipe(duplex=False)
    process = context.Process(
        target=_process_main,
        name="trgl-coordinator",
        # Daemon: a parent that exits without joining takes it down (SIGTERM -> flush, exit).
        daemon=True,
        # The secret travels through the spawn pipe, never on a command line.
        args=(job, settings, os.getpid(), ready_send),
    )
    process.start()
    ready_send.close()
    try:
        records, watch = _await_ready(process, ready_recv, settings.startup_timeout_s)
    finally:
        ready_recv.close()
    return process, CoordinatorAddresses(
        _connect_address(records, connect_host), _connect_address(watch, connect_host)
    )


def _await_ready(process: BaseProcess, ready: Connection, timeout_s: float) -> tuple[str, str]:
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
    records, watch = detail
    return str(records), str(watch)


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


def _process_main(
    job: CoordinatorJob, settings: CoordinatorSettings, parent_pid: int, ready: Connection
) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s [coordinator] %(message)s", datefmt="%H:%M:%S"
    )
    sys.exit(run_coordinator(job, settings, parent_pid=parent_pid, ready=ready))


def _bind_pull(context: zmq.Context[Any], bind: str, settings: CoordinatorSettings) -> Any:
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, settings.receive_hwm)
    # libzmq drops (and disconnects) a sender of a bigger message before it reaches us.
    sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(bind)
    return sock


def _bind_pub(context: zmq.Context[Any], records_endpoint: str) -> Any:
    """The broadcast socket, on the records socket's interface, on a free port."""
    sock = context.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 500)  # an abort should reach the ranks before we exit
    host = records_endpoint.partition("://")[2].rpartition(":")[0]
    sock.bind(f"tcp://{host}:0")
    return sock


def run_coordinator(
    job: CoordinatorJob,
    settings: CoordinatorSettings | None = None,
    *,
    parent_pid: int | None = None,
    ready: Connection | None = None,
) -> int:
    """The coordinator's body; returns the exit code (0 done, 1 failed, 2 no bind)."""
    settings = settings or CoordinatorSettings()
    context: zmq.Context[Any] = zmq.Context()
    broadcast = None
    try:
        try:
            sock = _bind_pull(context, job.bind, settings)
        except zmq.ZMQError as exc:
            if ready is not None:
                ready.send(("error", f"metrics coordinator cannot bind {job.bind}: {exc.strerror}"))
            return 2
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        broadcast = _bind_pub(context, endpoint)
        watch = broadcast.getsockopt_string(zmq.LAST_ENDPOINT)
        if ready is not None:
            ready.send(("ready", (endpoint, watch)))
            ready.close()
        logger.info("collecting metrics on %s into %s", endpoint, job.run_dir)
        runlog = RunLog(job.run_dir, append=job.append, tensorboard=settings.tensorboard)
        state = Collector(runlog, sock, job.shape, job.secret, settings, parent_pid, broadcast)
        state.extra = dict(job.extra)
        state.checkpoints = job.checkpoints
        return state.run()
    finally:
        if broadcast is not None:
            broadcast.close(linger=500)  # the last word (done or abort) should get out
        context.destroy(linger=0)
