"""The compute thread first: helper threads and the coordinator yield the core to it.

Besides the thread that computes, a rank runs a receiver and a sender thread per link,
Gloo's I/O and worker threads, the watchdog and pyzmq's I/O thread; rank 0 also starts the
metrics coordinator. Each wakes up several times per batch, and under Linux's default
policy a thread that wakes up preempts the one running on its core: measured on this
project's 2-core machine (quick preset of the throughput benchmark, 2 stages), a stage's
compute thread was preempted 36-55 times per step in the pipeline against 10-12 times for
the same computation in a process of its own, and 29-30 times with the helpers under
SCHED_BATCH (benchmarks/throughput, profile_runtime.py).

``SCHED_BATCH`` (sched(7)) keeps a thread's share of the CPU but stops its wake-ups from
preempting: a helper that wakes runs when the compute thread's time slice ends or the core
is idle, a few milliseconds later at most. The helpers' latency does not matter as long as
the buffers hold a batch ahead, which they do by construction. Linux only; elsewhere, or
where the kernel refuses, nothing changes.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

_TASKS = "/proc/self/task"


def _to_batch(tid: int) -> bool:
    """Thread ``tid`` (0: the calling one) from the default policy to SCHED_BATCH."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return False
    try:
        if os.sched_getscheduler(tid) != os.SCHED_OTHER:
            return False  # a policy someone chose on purpose stays
        os.sched_setscheduler(tid, policy, os.sched_param(0))
    except OSError:  # the thread ended meanwhile, or the kernel said no
        return False
    return True


def yield_to_compute() -> int:
    """Put every thread of this process but the calling one (the compute thread) under
    SCHED_BATCH; returns how many were changed. Threads started later inherit the policy
    of the thread that starts them, so call this once the helpers exist."""
    if not os.path.isdir(_TASKS):
        return 0
    keep = threading.get_native_id()
    changed = sum(_to_batch(int(name)) for name in os.listdir(_TASKS) if int(name) != keep)
    log.debug("%d helper threads under SCHED_BATCH", changed)
    return changed


def run_in_background() -> bool:
    """The calling thread, and every thread it starts from now on, under SCHED_BATCH: for
    a helper process (the coordinator), called before it starts any thread."""
    return _to_batch(0)
