"""A stage's busy time: by the host clock on CPU, by CUDA events on GPU, where the host only
queues work and its clock says little about when the device computed."""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Protocol

import torch


class Timer(Protocol):
    device_based: bool

    def start(self) -> Any: ...

    def stop(self, token: Any) -> None: ...

    def busy_s(self) -> float: ...

    def settle(self) -> None: ...


class HostTimer:
    """Busy seconds by the host clock: right on CPU, where work runs as it is issued."""

    device_based = False

    def __init__(self) -> None:
        self.busy = 0.0

    def start(self) -> Any:
        return time.perf_counter()

    def stop(self, token: Any) -> None:
        self.busy += time.perf_counter() - token

    def busy_s(self) -> float:
        return self.busy

    def settle(self) -> None:
        pass


class CudaTimer:
    """Busy seconds on the device: an event before and after each step on the compute
    stream, read once they have completed (never waited for)."""

    device_based = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: deque[tuple[Any, Any]] = deque()
        self.busy = 0.0

    def start(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def stop(self, token: Any) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        self.pending.append((token, end))

    def busy_s(self) -> float:
        while self.pending and self.pending[0][1].query():
            start, end = self.pending.popleft()
            self.busy += start.elapsed_time(end) / 1000.0
        return self.busy

    def settle(self) -> None:
        """Wait for the last step's event (once, at the end of the run)."""
        if self.pending:
            self.pending[-1][1].synchronize()


def timer_for(device: torch.device) -> HostTimer | CudaTimer:
    return CudaTimer(device) if device.type == "cuda" else HostTimer()
