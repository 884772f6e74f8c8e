"""The metrics coordinator: a spawned process that gathers stage records and writes the run."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from trgl_dist.manifest import CheckpointError, write_manifest
from trgl_dist.metrics_client import DEFAULT_MAX_MESSAGE_BYTES
from trgl_dist.progress import ProgressLine
from trgl_dist.report import format_console_report, write_report
from trgl_dist.runlog import (
    RunLog,
    diagnose_failure,
    failure_info,
    read_metrics,
    summarize,
    write_summary,
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
        state = _Collector(runlog, sock, world_size, num_modules, regime, settings, parent_pid)
        state.extra = dict(extra or {})
        state.checkpoints = checkpoints
        return state.run()
    finally:
        context.destroy(linger=0)


class _Collector:
    """Receives records, writes them, and decides when and how the run ended."""

    def __init__(
        self,
        runlog: RunLog,
        sock: Any,
        world_size: int,
        num_modules: int,
        regime: str,
        settings: CoordinatorSettings,
        parent_pid: int | None,
    ) -> None:
        self.runlog, self.sock, self.settings = runlog, sock, settings
        self.world_size, self.num_modules, self.regime = world_size, num_modules, regime
        self.parent_pid = parent_pid
        self.extra: dict[str, Any] = {}  # added to summary.json
        # {"meta": ..., "keep": N}: a step's manifest is written once every stage saved it
        self.checkpoints: dict[str, Any] | None = None
        self.saved: dict[int, set[Any]] = {}
        self.received = self.malformed = 0
        self.finished: set[Any] = set()  # stages that sent "end"
        self.reports: list[dict[str, Any]] = []  # "error" and "end" records, for the diagnosis
        self.first_error_at: float | None = None
        self.parent_lost = False
        self.signal: int | None = None
        self.signals = 0
        self.progress = ProgressLine(num_modules, settings.progress_interval_s)
        self.last_record_at = self.last_parent_check = time.monotonic()

    def run(self) -> int:
        self._install_signal_handlers()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while True:
            if poller.poll(200):
                self._drain()
            now = time.monotonic()
            self.progress.maybe_log(now)
            outcome = self._outcome(now)
            if outcome is not None:
                return self._finish(*outcome)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. under a test)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.signal = signum
            self.signals += 1

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def _drain(self) -> None:
        for _ in range(10_000):  # bounded, so deadlines are still checked under a flood
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._accept(raw)

    def _accept(self, raw: bytes) -> None:
        try:
            rec = json.loads(raw)  # JSON only: a record must never execute anything (no pickle)
        except (ValueError, RecursionError):
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("kind"), str):
            self.malformed += 1
            if self.malformed <= 3:
                logger.warning("ignoring a malformed metrics message (%d bytes)", len(raw))
            return
        self.received += 1
        self.last_record_at = time.monotonic()
        self.runlog.record(rec)
        self.progress.observe(rec)
        if rec["kind"] == "checkpoint":
            self._checkpointed(rec)
        if rec["kind"] in ("end", "error"):
            self.reports.append(rec)
        if rec["kind"] == "end":
            self.finished.add(rec.get("stage"))
        elif rec["kind"] == "error" and self.first_error_at is None:
            self.first_error_at = self.last_record_at
            logger.info("stage %s reported an error; gathering reports", rec.get("stage"))

    def _checkpointed(self, rec: dict[str, Any]) -> None:
        """Every stage wrote its file for this step: declare the checkpoint complete."""
        step = rec.get("step")
        if self.checkpoints is None or not isinstance(step, int):
            return
        stages = self.saved.setdefault(step, set())
        stages.add(rec.get("stage"))
        if len(stages) < self.world_size:
            return
        del self.saved[step]
        meta = {**self.checkpoints["meta"], "position": {}}
        try:
            write_manifest(self.runlog.run_dir, step, meta, int(self.checkpoints["keep"]))
        except (OSError, CheckpointError) as err:
            logger.warning("checkpoint step %d not completed: %s", step, err)

    def _outcome(self, now: float) -> tuple[str, dict[str, Any] | None] | None:
        """(how it ended, failure) once the run is over; None while it goes on."""
        if self.signals > 1:  # asked twice: stop now, with what is known
            return "failed", self._diagnose()
        if self.signal is not None and self.first_error_at is None:
            # The launcher stops every process at once (torchrun after a rank died, or
            # Ctrl-C): keep gathering the stages' last reports for the grace period.
            self.first_error_at = now
        self._check_parent(now)
        # rank r runs stage r: a report from either names the same process
        reported = {r.get("rank", r.get("stage")) for r in self.reports}
        everyone = len(reported) >= self.world_size
        if self.first_error_at is None:
            if everyone:
                return "done", None
            return self._idle_outcome(now)
        if everyone or now - self.first_error_at >= self.settings.grace_s:
            return "failed", self._diagnose()
        return None

    def _check_parent(self, now: float) -> None:
        if self.parent_pid is None or self.parent_lost:
            return
        if now - self.last_parent_check < self.settings.parent_poll_s:
            return
        self.last_parent_check = now
        # Reparenting is the only sign of a SIGKILLed parent: nothing else would tell us.
        if os.getppid() != self.parent_pid:
            self.parent_lost = True
            logger.info("parent process %d is gone; gathering reports", self.parent_pid)
            if self.first_error_at is None:
                self.first_error_at = now

    def _idle_outcome(self, now: float) -> tuple[str, dict[str, Any]] | None:
        idle = self.settings.idle_timeout_s
        if idle is None or now - self.last_record_at < idle:
            return None
        silent = sorted(set(range(self.world_size)) - self.finished)
        description = f"no metrics for {idle:.0f} s; stages {silent} never finished"
        return "failed", failure_info(None, None, "idle", description)

    def _diagnose(self) -> dict[str, Any]:
        failure = diagnose_failure(self.reports, self.world_size)
        if failure is not None:
            return failure
        if self.signal is not None:
            name = signal.Signals(self.signal).name
            return failure_info(
                None, None, "interrupted", f"stopped by {name} (Ctrl-C or launcher)"
            )
        # no stage said anything: the parent (rank 0) vanished
        description = "stage 0 (rank 0) died without reporting (killed?): parent process gone"
        return failure_info(0, 0, "died", description)

    def _finish(self, how: str, failure: dict[str, Any] | None) -> int:
        self.runlog.close()
        records = read_metrics(self.runlog.metrics_path)
        stats = {"received": self.received, "malformed": self.malformed}
        extra = {**self.extra, "failure": failure, "coordinator": stats}
        summary = summarize(records, regime=self.regime, num_modules=self.num_modules, extra=extra)
        write_summary(self.runlog.run_dir, summary)
        try:
            write_report(self.runlog.run_dir, records, summary)
        except Exception:  # a plotting problem must not turn a finished run into a failed one
            logger.exception("could not write the report")
        if failure is not None:
            sys.stderr.write(f"trgl_dist: training failed: {failure['description']}\n")
            sys.stderr.flush()
            return 1
        sys.stdout.write(format_console_report(summary) + "\n")
        sys.stdout.flush()
        return 0
