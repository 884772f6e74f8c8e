"""The one-process regimes: e2e and parallel (lock-step), sequential and multilap."""

from __future__ import annotations

from collections.abc import Callable

from trgl_dist.regimes.common import Context
from trgl_dist.regimes.lockstep import train_lockstep
from trgl_dist.regimes.sequential import train_sequential

RUNNERS: dict[str, Callable[[Context], None]] = {
    "e2e": train_lockstep,
    "parallel": train_lockstep,
    "sequential": train_sequential,
    "multilap": train_sequential,
}

__all__ = ["RUNNERS", "Context"]
