"""How a run ended badly: the root cause among the ranks' reports, in one line for people;
and the frozen ranks that must be stopped for the run to end."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from trgl_dist.layout import Layout
from trgl_dist.metrics.records import EndRecord, ErrorRecord, Record, of_kind


@dataclass(frozen=True)
class Failure:
    """The "failure" entry of summary.json; ``description`` is the one line shown to people."""

    stage: int | None
    rank: int | None
    cause: str
    description: str
    message: str = ""
    reported_by: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["message"] = self.message or self.description
        return out


def reporters(records: Sequence[Record]) -> set[int]:
    """The ranks that said how they ended: an error or an end record."""
    ended = {r.rank for r in of_kind(records, EndRecord)}
    return ended | {r.rank for r in of_kind(records, ErrorRecord)}


def diagnose_failure(records: Sequence[Record], layout: Layout | None = None) -> Failure | None:
    """The root cause among the error records, or None when there is none.

    A raised exception is the cause. Otherwise the rank that died is one that never
    reported (neither error nor end): first one named in "peer-lost" reports, else, when
    the ``layout`` (hence every rank) is known, any silent rank. Ranks stopped by a signal
    ("interrupted", e.g. the launcher's SIGTERM after another rank died) are never the
    cause if another is found.
    """
    errors: list[ErrorRecord] = of_kind(records, ErrorRecord)
    if not errors:
        return None

    def where(rank: int, stage: int | None = None) -> str:
        if layout is not None:
            return layout.describe(rank)
        return f"stage {rank if stage is None else stage} (rank {rank})"

    for err in errors:
        if err.cause == "exception":
            description = f"{where(err.rank, err.stage)} raised: {err.message}"
            return Failure(err.stage, err.rank, "exception", description, err.message)
    reported = reporters(records)
    silent = Counter(
        e.peer
        for e in errors
        if e.cause == "peer-lost" and e.peer is not None and e.peer not in reported
    )
    if not silent and layout is not None:
        silent.update(rank for rank in range(layout.world_size) if rank not in reported)
    if silent:
        dead = silent.most_common(1)[0][0]
        stage = layout.stage_of(dead) if layout is not None else dead
        description = f"{where(dead)} died without reporting (killed?)"
        reported_by = sorted(e.rank for e in errors)
        return Failure(stage, dead, "died", description, reported_by=reported_by)
    first = next((e for e in errors if e.cause != "interrupted"), errors[0])
    description = f"{where(first.rank, first.stage)} {first.cause}: {first.message}"
    return Failure(first.stage, first.rank, first.cause, description, first.message)


@dataclass(frozen=True)
class NodeRanks:
    """The ranks running on this node, by pid, and the launcher that started them: the
    processes one may SIGKILL here when they freeze. A SIGSTOPped rank ignores the
    launcher's SIGTERM until it is continued, so the launcher would wait out its whole grace
    period for it (30 s for torchrun)."""

    pids: dict[int, int] = field(default_factory=dict)  # rank -> pid
    launcher_pid: int | None = None

    def _process(self, rank: int) -> psutil.Process | None:
        """The rank's process, if it is still the launcher's child (its pid not reused)."""
        pid = self.pids.get(rank)
        if pid is None or self.launcher_pid is None:
            return None
        try:
            process = psutil.Process(pid)
            return process if process.ppid() == self.launcher_pid else None
        except psutil.Error:
            return None

    def is_stopped(self, rank: int) -> bool:
        process = self._process(rank)
        try:
            return process is not None and process.status() == psutil.STATUS_STOPPED
        except psutil.Error:
            return False

    def kill(self, rank: int) -> None:
        """SIGKILL the rank; harmless if it has already ended."""
        process = self._process(rank)
        if process is not None:
            with contextlib.suppress(psutil.Error):
                process.kill()  # psutil checks the pid still names the same process
