"""The coordinator's loop: receive signed records, check them, write them, judge the end."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from types import FrameType
from typing import Any

import zmq

from trgl_dist.checkpoints.manifest import write_manifest
from trgl_dist.errors import CheckpointError, StorageError
from trgl_dist.layout import Layout
from trgl_dist.metrics.client import DEFAULT_MAX_MESSAGE_BYTES, HEARTBEAT, signature
from trgl_dist.metrics.closing import close_run
from trgl_dist.metrics.failure import Failure, NodeRanks, diagnose_failure, reporters
from trgl_dist.metrics.progress import ProgressLine
from trgl_dist.metrics.records import (
    CheckpointRecord,
    EndRecord,
    EpochRecord,
    ErrorRecord,
    EvalRecord,
    Record,
    RecordError,
    StageRecord,
    TrainRecord,
    decode,
)
from trgl_dist.metrics.runlog import RunLog
from trgl_dist.metrics.trace import ClockOffsets, merge_trace

logger = logging.getLogger("trgl_dist.coordinator")


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
    broadcast_every_s: float = 0.5  # "alive" to the ranks' watchdogs


#: What the coordinator tells every rank's watchdog (runtime/watchdog.py), as the first frame.
ALIVE, ABORT, DONE = b"alive", b"abort", b"done"


@dataclass(frozen=True)
class RunShape:
    """What a record may name: the run's ranks, stages and modules; and how long a rank
    may stay silent (no record, no heartbeat) before it counts as frozen."""

    world_size: int
    num_modules: int
    regime: str
    silence_timeout_s: float | None = None  # None: never
    replicas: tuple[int, ...] = ()  # per stage (see layout.py); empty: one each

    @property
    def layout(self) -> Layout:
        return Layout(tuple(self.replicas) or (1,) * self.world_size)

    def stage_of(self, rank: int) -> int:
        return self.layout.stage_of(rank)


class Rejected(ValueError):
    """A message that is dropped and counted; the message says why (for the log)."""


class Collector:
    """Receives records, writes them, and decides when and how the run ended."""

    def __init__(
        self,
        runlog: RunLog,
        sock: Any,
        shape: RunShape,
        secret: bytes,
        settings: CoordinatorSettings,
        parent_pid: int | None,
        broadcast: Any = None,
    ) -> None:
        self.runlog, self.sock, self.shape, self.settings = runlog, sock, shape, settings
        self.broadcast = broadcast  # a PUB socket the ranks' watchdogs listen to (or None)
        self.secret = secret
        self.parent_pid = parent_pid
        self.extra: dict[str, Any] = {}  # added to summary.json
        # {"meta": ..., "keep": N}: a step's manifest is written once every stage saved it
        self.checkpoints: dict[str, Any] | None = None
        self.saved: dict[int, set[int]] = {}
        self.received = self.malformed = 0
        self.rejected: Counter[str] = Counter()  # why messages were dropped
        self.reports: list[Record] = []  # error and end records, for the diagnosis
        self.first_error_at: float | None = None
        self.parent_lost = False
        self.signal: int | None = None
        self.signals = 0
        self.progress = ProgressLine(shape.num_modules, settings.progress_interval_s)
        self.last_record_at = self.last_parent_check = self.last_broadcast = time.monotonic()
        self.heard = dict.fromkeys(range(shape.world_size), self.last_record_at)
        self.clocks = ClockOffsets()  # each rank's, from its heartbeats: for the trace
        self.frozen: Failure | None = None
        self.node = NodeRanks()  # the ranks on this node: a frozen one is SIGKILLed here
        self.storage: Failure | None = None  # the run directory could not be written

    def run(self) -> int:
        self._install_signal_handlers()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while True:
            if poller.poll(200):
                self._drain()
            now = time.monotonic()
            self.progress.maybe_log(now)
            self._tell(ALIVE, now)
            outcome = self._outcome(now)
            if outcome is not None:
                return self._finish(outcome)

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
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                rank, rec = self._verify(frames)
            except Rejected as why:
                self._reject(str(why), sum(len(f) for f in frames))
                continue
            self.heard[rank] = time.monotonic()
            if rec is not None:
                self._accept(rank, rec)

    def _verify(self, frames: list[bytes]) -> tuple[int, Record | None]:
        """(sending rank, record or None for a heartbeat) of an authentic, valid message."""
        if len(frames) != 3:
            raise Rejected("not a three-frame message")
        rank_frame, mac, payload = frames
        if not hmac.compare_digest(mac, signature(self.secret, rank_frame, payload)):
            raise Rejected("bad signature (not from this run's ranks)")
        try:
            rank = int(rank_frame)
        except ValueError:
            raise Rejected("the rank frame is not an integer") from None
        if not 0 <= rank < self.shape.world_size:
            raise Rejected(f"rank {rank} is not in this run")
        if not payload:  # a heartbeat without a clock
            return rank, None
        if payload[:1] == HEARTBEAT:
            try:
                sent_ns = int(payload[1:])
            except ValueError:
                raise Rejected(f"a heartbeat from rank {rank} without its clock") from None
            self.clocks.observe(rank, sent_ns, time.time_ns())
            return rank, None
        try:
            rec = decode(json.loads(payload))
        except (ValueError, RecursionError, RecordError) as err:
            raise Rejected(f"invalid record from rank {rank}: {err}") from None
        self._check_origin(rank, rec)
        return rank, rec

    def _check_origin(self, rank: int, rec: Record) -> None:
        """A record may speak only for its sender, and only of modules the run has."""
        stage = self.shape.stage_of(rank)
        replica = self.shape.layout.place(rank)[1]
        if (
            getattr(rec, "stage", stage) != stage
            or getattr(rec, "rank", rank) != rank
            or getattr(rec, "replica", replica) != replica
        ):
            raise Rejected(f"a {rec.kind} record from rank {rank} names another rank or stage")
        if isinstance(rec, TrainRecord | EvalRecord) and rec.module >= self.shape.num_modules:
            raise Rejected(f"module {rec.module} is not in this run")
        if isinstance(rec, StageRecord | CheckpointRecord) and any(
            m >= self.shape.num_modules for m in rec.modules
        ):
            raise Rejected(f"a {rec.kind} record names a module the run does not have")
        if isinstance(rec, EpochRecord) and stage != 0:
            raise Rejected(f"an epoch record from stage {stage} (only stage 0 counts epochs)")
        peer = rec.peer if isinstance(rec, ErrorRecord) else None
        if peer is not None and peer >= self.shape.world_size:
            raise Rejected(f"an error record names rank {peer}, not in this run")

    def _reject(self, why: str, size: int) -> None:
        self.malformed += 1
        self.rejected[why.split(":")[0]] += 1
        if self.malformed <= 3:
            logger.warning("ignoring a metrics message (%d bytes): %s", size, why)

    def _accept(self, rank: int, rec: Record) -> None:
        self.received += 1
        self.last_record_at = time.monotonic()
        try:
            self.runlog.record(rec)
        except StorageError as err:
            self._cannot_write(err)  # and go on: the record still counts for the diagnosis
        self.progress.observe(rec)
        if isinstance(rec, CheckpointRecord):
            self._checkpointed(rec)
        elif isinstance(rec, EndRecord | ErrorRecord):
            self.reports.append(rec)
            if isinstance(rec, ErrorRecord) and self.first_error_at is None:
                self.first_error_at = self.last_record_at
                logger.info("stage %s reported an error; gathering reports", rec.stage)

    def _checkpointed(self, rec: CheckpointRecord) -> None:
        """Every module's file of this step is written: declare the checkpoint complete."""
        if self.checkpoints is None:
            return
        modules = self.saved.setdefault(rec.step, set())
        modules.update(rec.modules)
        if len(modules) < self.shape.num_modules:
            return
        del self.saved[rec.step]
        meta = {**self.checkpoints["meta"], "position": {}}
        try:
            write_manifest(self.runlog.run_dir, rec.step, meta, int(self.checkpoints["keep"]))
        except CheckpointError as err:
            logger.warning("checkpoint step %d not completed: %s", rec.step, err)
        except StorageError as err:
            self._cannot_write(err)

    def _outcome(self, now: float) -> tuple[Failure | None] | None:
        """(the failure or None) once the run is over; None while it goes on."""
        if self.signals > 1:  # asked twice: stop now, with what is known
            return (self._diagnose(),)
        if self.signal is not None and self.first_error_at is None:
            # The launcher stops every process at once (torchrun after a rank died, or
            # Ctrl-C): keep gathering the stages' last reports for the grace period.
            self.first_error_at = now
        self._check_parent(now)
        self._check_silence(now)
        everyone = len(reporters(self.reports)) >= self.shape.world_size
        if self.first_error_at is None:
            if everyone:
                return (None,)
            return self._idle_outcome(now)
        if everyone or now - self.first_error_at >= self.settings.grace_s:
            return (self._diagnose(),)
        return None

    def _cannot_write(self, err: StorageError) -> None:
        """The run directory cannot take more (disk full): the run stops, saying so; the
        last complete checkpoint stays as it is."""
        if self.storage is None:
            self.storage = Failure(None, None, "storage", f"the coordinator {err}")
            logger.info("%s; stopping the run", self.storage.description)
            if self.first_error_at is None:
                self.first_error_at = time.monotonic()

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

    def _check_silence(self, now: float) -> None:
        """A rank that has neither ended nor been heard for the silence timeout is frozen."""
        limit = self.shape.silence_timeout_s
        if limit is None or self.frozen is not None:
            return
        silent = [
            rank
            for rank, heard in self.heard.items()
            if now - heard > limit and rank not in reporters(self.reports)
        ]
        if not silent:
            return
        self._freeze(silent[0], f"nothing heard for {limit:.0f} s (frozen? --link-timeout)", now)

    def _check_stopped(self, now: float) -> None:
        """A rank of this node that is stopped (SIGSTOP) is frozen, silence timeout or not:
        its neighbours may have ended on their own link timeouts first."""
        silent = set(range(self.shape.world_size)) - reporters(self.reports)
        for rank in sorted(silent):
            if not self.node.is_stopped(rank):
                continue
            if self.frozen is None:
                self._freeze(rank, "its process is stopped (SIGSTOP?)", now)  # kills it
            else:
                self.node.kill(rank)

    def _freeze(self, rank: int, why: str, now: float) -> None:
        """Judge ``rank`` frozen; stop it at once if it runs here (the others' watchdogs
        stop it on theirs once told), since nothing else will."""
        description = f"{self.shape.layout.describe(rank)} stopped responding: {why}"
        self.frozen = Failure(self.shape.stage_of(rank), rank, "frozen", description)
        logger.info("%s; gathering reports", description)
        self.node.kill(rank)
        if self.first_error_at is None:
            self.first_error_at = now

    def _tell(self, what: bytes, now: float, *detail: bytes) -> None:
        """Broadcast to the ranks' watchdogs ("alive" at most every broadcast_every_s)."""
        if self.broadcast is None:
            return
        if what == ALIVE and now - self.last_broadcast < self.settings.broadcast_every_s:
            return
        self.last_broadcast = now
        # PUB drops what nobody listens to: what a broadcast may do.
        with contextlib.suppress(zmq.ZMQError):
            self.broadcast.send_multipart([what, *detail], zmq.NOBLOCK)

    def _idle_outcome(self, now: float) -> tuple[Failure] | None:
        idle = self.settings.idle_timeout_s
        if idle is None or now - self.last_record_at < idle:
            return None
        silent = sorted(set(range(self.shape.world_size)) - reporters(self.reports))
        description = f"no metrics for {idle:.0f} s; stages {silent} never finished"
        return (Failure(None, None, "idle", description),)

    def _diagnose(self) -> Failure:
        self._check_stopped(time.monotonic())
        failure = diagnose_failure(self.reports, self.shape.layout)
        if self.storage is not None and (failure is None or failure.cause != "exception"):
            return self.storage
        if failure is not None and (self.frozen is None or failure.cause == "exception"):
            return failure
        if self.frozen is not None:
            return self.frozen
        if self.signal is not None:
            name = signal.Signals(self.signal).name
            return Failure(None, None, "interrupted", f"stopped by {name} (Ctrl-C or launcher)")
        # no stage said anything: the parent (rank 0) vanished
        description = "stage 0 (rank 0) died without reporting (killed?): parent process gone"
        return Failure(0, 0, "died", description)

    def _finish(self, outcome: tuple[Failure | None]) -> int:
        (failure,) = outcome
        if failure is None:
            self._tell(DONE, time.monotonic())
        else:
            # Every rank stops now, wherever it waits; the culprit's node-mates stop it too
            # (a frozen process would otherwise hold the launcher for its grace period).
            culprit = b"" if failure.rank is None else str(failure.rank).encode()
            detail = (failure.description.encode(), culprit, failure.cause.encode())
            self._tell(ABORT, time.monotonic(), *detail)
        self.runlog.close()
        merge_trace(self.runlog.run_dir, self.clocks)
        stats = {
            "received": self.received,
            "malformed": self.malformed,
            "rejected": dict(self.rejected),
        }
        close_run(
            self.runlog.run_dir,
            regime=self.shape.regime,
            num_modules=self.shape.num_modules,
            failure=failure,
            extra={**self.extra, "coordinator": stats},
        )
        return 0 if failure is None else 1
