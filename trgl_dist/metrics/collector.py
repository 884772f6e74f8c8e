"""The coordinator's loop: receive JSON records, write them, decide how the run ended."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import zmq

from trgl_dist.checkpoints.manifest import CheckpointError, write_manifest
from trgl_dist.metrics.progress import ProgressLine
from trgl_dist.metrics.report import format_console_report, write_report
from trgl_dist.metrics.runlog import (
    RunLog,
    diagnose_failure,
    failure_info,
    read_metrics,
    summarize,
    write_summary,
)

if TYPE_CHECKING:
    from trgl_dist.metrics.coordinator import CoordinatorSettings

logger = logging.getLogger("trgl_dist.metrics.coordinator")


class Collector:
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
