"""A rank's watchdog: it keeps the coordinator informed, and stops the rank when the run is over.

Links alone cannot see everything: a SIGSTOPped peer keeps its sockets open, NCCL never
notices a dead peer, a killed launcher leaves its workers running, and a main thread inside
a CUDA synchronization cannot run a signal handler. One thread per rank covers all of it:
- every second it sends a heartbeat; the coordinator declares a rank silent for
  ``--link-timeout`` seconds frozen, SIGKILLs it if it runs on the coordinator's node, and
  tells every rank to stop;
- it listens to the coordinator: "abort" (the run failed: exit at once; if the rank to
  blame shares this node, SIGKILL it first, since a stopped process ignores the launcher's
  SIGTERM), "done" (the run ended: stand down), "alive" (its heartbeat);
- it exits the rank, with one line, when the coordinator falls silent or the launcher that
  started this process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Any

import zmq

from trgl_dist.metrics.client import MetricsClient
from trgl_dist.metrics.collector import ABORT, DONE
from trgl_dist.metrics.coordinator import CoordinatorProcess
from trgl_dist.metrics.failure import NodeRanks
from trgl_dist.runtime.topology import Topology

logger = logging.getLogger(__name__)
HEARTBEAT_S = 1.0
#: The coordinator broadcasts every 0.5 s; this much silence means it is gone or frozen.
COORDINATOR_SILENCE_S = 15.0
#: How long rank 0 waits for its coordinator to write the run's summary before exiting.
COORDINATOR_FINISH_S = 60.0


class Watchdog(threading.Thread):
    """See the module docstring. ``start()`` it once the rank's metrics client is connected;
    ``stand_down()`` once the rank has finished its part (before its own teardown)."""

    def __init__(
        self,
        client: MetricsClient,
        watch_address: str,
        topology: Topology,
        *,
        coordinator: CoordinatorProcess | None = None,
        coordinator_silence_s: float = COORDINATOR_SILENCE_S,
    ) -> None:
        super().__init__(name="trgl-watchdog", daemon=True)
        self.client = client
        self.watch_address = watch_address
        # Plain values only: a thread that outlives the process group must not hold its
        # last reference (a ProcessGroup destroyed by a daemon thread at interpreter exit
        # aborts the process).
        self.rank = topology.rank
        self.node = node_ranks(topology)
        self.coordinator = coordinator  # rank 0's child: waited for before rank 0 exits
        self.coordinator_silence_s = coordinator_silence_s
        self.parent_pid = os.getppid()
        self.where = f"stage {topology.stage} (rank {topology.rank})"
        # Not ``_stop``: threading.Thread has a method of that name, used by join and fork.
        self._standing_down = threading.Event()

    def stand_down(self) -> None:
        """Stop watching and wait for the thread to end (the rank's part of the run is done)."""
        self._standing_down.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(5.0)

    def run(self) -> None:
        context: zmq.Context[Any] = zmq.Context()
        try:
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(self.watch_address)
            self._watch(sub)
        finally:
            context.destroy(linger=0)

    def _watch(self, sub: Any) -> None:
        last_alive = next_beat = time.monotonic()
        while not self._standing_down.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self.client.heartbeat()
                next_beat = now + HEARTBEAT_S
            if sub.poll(200):
                frames = sub.recv_multipart()
                last_alive = time.monotonic()
                if frames[0] == ABORT:
                    self._abort(frames[1:])
                if frames[0] == DONE:
                    return
            if self._standing_down.is_set():
                return
            if os.getppid() != self.parent_pid:
                self._exit(f"the launcher (pid {self.parent_pid}) is gone")
            if time.monotonic() - last_alive > self.coordinator_silence_s:
                if self.coordinator is not None:  # frozen, it would outlive the run
                    self.coordinator.kill()
                self._exit(
                    f"the metrics coordinator has been silent for {self.coordinator_silence_s:.0f}"
                    " s (dead or frozen)"
                )

    def _abort(self, detail: list[bytes]) -> None:
        """The coordinator judged the run failed and said so: stop, quietly (it printed the
        line that names the cause)."""
        culprit = int(detail[1]) if len(detail) > 2 and detail[1] else None
        frozen = len(detail) > 2 and detail[2] == b"frozen"
        if frozen and culprit is not None and culprit != self.rank:
            self.node.kill(culprit)  # it would hold the launcher for its grace period
        logger.debug("%s: stopping, the run failed: %s", self.where, detail[0].decode())
        if self.coordinator is not None:
            # It is writing the summary and the report: an exit now would orphan it.
            self.coordinator.join(COORDINATOR_FINISH_S)
        _flush_and_exit(1)

    def _exit(self, why: str) -> None:
        sys.stderr.write(f"trgl_dist: {self.where}: {why}; stopping\n")
        _flush_and_exit(1)


def _flush_and_exit(code: int) -> None:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def node_ranks(topology: Topology) -> NodeRanks:
    """The ranks on this rank's node (every rank of a node has the same launcher)."""
    placements = topology.placements
    if not placements:
        return NodeRanks()
    node = placements[topology.rank].node
    pids = {rank: p.pid for rank, p in enumerate(placements) if p.node == node}
    return NodeRanks(pids, os.getppid())
