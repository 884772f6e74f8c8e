"""The metrics coordinator: a process of its own that gathers the ranks' records into the run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from trgl_dist.errors import CoordinatorError
from trgl_dist.metrics.collector import Collector, CoordinatorSettings, RunShape
from trgl_dist.metrics.failure import NodeRanks
from trgl_dist.metrics.runlog import RunLog
from trgl_dist.scheduling import run_in_background

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
    node: NodeRanks = field(default_factory=NodeRanks)  # the ranks it may stop when frozen


@dataclass(frozen=True)
class CoordinatorAddresses:
    """Where the ranks reach a running coordinator."""

    records: str  # MetricsClients PUSH records and heartbeats here
    watch: str  # the ranks' watchdogs SUBscribe here: alive, abort, done


class CoordinatorProcess:
    """The running coordinator, as its parent (rank 0) sees it."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.terminate()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()


def start_coordinator(
    job: CoordinatorJob,
    settings: CoordinatorSettings | None = None,
    connect_host: str | None = None,
) -> tuple[CoordinatorProcess, CoordinatorAddresses]:
    """Start the coordinator; return it and the addresses the ranks connect to.

    It is a small process of its own (``python -m trgl_dist.metrics.coordinator``, no torch)
    in a session of its own, so the launcher's signals to the ranks' process group do not
    cut it short while it gathers their last reports; it watches its parent instead. The
    job (with the run's secret) goes through its stdin, never on a command line.
    ``connect_host`` is the address other nodes reach this one by, used when the job binds
    a wildcard (tcp://0.0.0.0:PORT).
    """
    settings = settings or CoordinatorSettings()
    ready_read, ready_write = os.pipe()
    spec = _job_json(job, settings, os.getpid(), ready_write)
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", "trgl_dist.metrics.coordinator"],
            stdin=subprocess.PIPE,
            pass_fds=(ready_write,),
            start_new_session=True,
        )
    finally:
        os.close(ready_write)
    process = CoordinatorProcess(popen)
    try:
        assert popen.stdin is not None
        popen.stdin.write(spec.encode())
        popen.stdin.close()
        records, watch = _await_ready(process, ready_read, settings.startup_timeout_s)
    finally:
        os.close(ready_read)
    return process, CoordinatorAddresses(
        _connect_address(records, connect_host), _connect_address(watch, connect_host)
    )


def _job_json(
    job: CoordinatorJob, settings: CoordinatorSettings, parent_pid: int, ready_fd: int
) -> str:
    return json.dumps(
        {
            "run_dir": str(job.run_dir),
            "shape": dataclasses.asdict(job.shape),
            "secret": job.secret.hex(),
            "bind": job.bind,
            "append": job.append,
            "extra": job.extra,
            "checkpoints": job.checkpoints,
            "node": dataclasses.asdict(job.node),
            "settings": dataclasses.asdict(settings),
            "parent_pid": parent_pid,
            "ready_fd": ready_fd,
        }
    )


def _await_ready(process: CoordinatorProcess, ready: int, timeout_s: float) -> tuple[str, str]:
    """The coordinator's first line on the ready pipe: "ready RECORDS WATCH" or "error ..."."""
    deadline = time.monotonic() + timeout_s
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            stop_coordinator(process, timeout_s=0)
            raise CoordinatorError(f"metrics coordinator did not start within {timeout_s:.0f} s")
        readable, _, _ = select.select([ready], [], [], min(remaining, 0.5))
        if readable:
            chunk = os.read(ready, 4096)
            if not chunk:  # the child closed its end: it died
                process.join(5)
                raise CoordinatorError(
                    f"metrics coordinator exited at start (code {process.exitcode})"
                )
            line += chunk
    status, _, detail = line.decode().strip().partition(" ")
    if status != "ready":
        stop_coordinator(process, timeout_s=5)
        raise CoordinatorError(detail)
    records, watch = detail.split()
    return records, watch


def stop_coordinator(process: CoordinatorProcess, timeout_s: float = 60.0) -> int | None:
    """Wait for the coordinator to finish; terminate, then kill, if it overstays."""
    process.join(timeout_s)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)
    return process.exitcode


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
    ready: Callable[[str], None] | None = None,
) -> int:
    """The coordinator's body; returns the exit code (0 done, 1 failed, 2 no bind).
    ``ready`` is told "ready RECORDS WATCH" once the sockets are bound, or "error WHY"."""
    settings = settings or CoordinatorSettings()
    context: zmq.Context[Any] = zmq.Context()
    broadcast = None
    try:
        try:
            sock = _bind_pull(context, job.bind, settings)
        except zmq.ZMQError as exc:
            if ready is not None:
                ready(f"error metrics coordinator cannot bind {job.bind}: {exc.strerror}")
            return 2
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        broadcast = _bind_pub(context, endpoint)
        watch = broadcast.getsockopt_string(zmq.LAST_ENDPOINT)
        if ready is not None:
            ready(f"ready {endpoint} {watch}")
        logger.info("collecting metrics on %s into %s", endpoint, job.run_dir)
        runlog = RunLog(job.run_dir, append=job.append, tensorboard=settings.tensorboard)
        state = Collector(runlog, sock, job.shape, job.secret, settings, parent_pid, broadcast)
        state.extra = dict(job.extra)
        state.checkpoints = job.checkpoints
        state.node = job.node
        return state.run()
    finally:
        if broadcast is not None:
            broadcast.close(linger=500)  # the last word (done or abort) should get out
        context.destroy(linger=0)


def _quit(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def _main() -> int:
    """``python -m trgl_dist.metrics.coordinator``: the job as JSON on stdin."""
    # Signals first: a Ctrl-C while starting ends this process quietly, like any later one.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _quit)
    run_in_background()  # never preempt a rank's compute (scheduling.py); before zmq's threads
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s [coordinator] %(message)s", datefmt="%H:%M:%S"
    )
    spec = json.loads(sys.stdin.read())
    job = CoordinatorJob(
        Path(spec["run_dir"]),
        RunShape(**spec["shape"]),
        bytes.fromhex(spec["secret"]),
        bind=spec["bind"],
        append=spec["append"],
        extra=spec["extra"],
        checkpoints=spec["checkpoints"],
        node=NodeRanks(
            {int(rank): pid for rank, pid in spec["node"]["pids"].items()},
            spec["node"]["launcher_pid"],
        ),
    )
    ready_fd = int(spec["ready_fd"])

    def ready(line: str) -> None:
        os.write(ready_fd, (line + "\n").encode())
        os.close(ready_fd)

    return run_coordinator(
        job, CoordinatorSettings(**spec["settings"]), parent_pid=spec["parent_pid"], ready=ready
    )


if __name__ == "__main__":
    sys.exit(_main())
