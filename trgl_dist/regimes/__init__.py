"""The single-process regimes: e2e, parallel (lock-step reference), sequential, multilap."""

from __future__ import annotations

from collections.abc import Callable

from trgl_dist.regimes.common import Context
from trgl_dist.regimes.e2e import train_e2e
from trgl_dist.regimes.parallel import train_parallel
from trgl_dist.regimes.sequential import train_sequential

RUNNERS: dict[str, Callable[[Context], None]] = {
    "e2e": train_e2e,
    "parallel": train_parallel,
    "sequential": train_sequential,
    "multilap": train_sequential,
}

__all__ = ["RUNNERS", "Context"]
