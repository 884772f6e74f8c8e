"""One link between two stages: a receiver thread into the inbox, a sender thread out."""

from __future__ import annotations

import logging
import threading
import time

import torch
from torch.distributed import ProcessGroup

from trgl_dist.runtime.buffer import BatchBuffer, BufferClosed
from trgl_dist.runtime.wire import recv_batch, send_batch, wire_bytes
from trgl_dist.training.items import Kind

logger = logging.getLogger(__name__)

# A link thread blocked in recv/send on a live but stuck peer cannot be interrupted;
# joining gives up after this long (the threads are daemons, the process can still exit).
JOIN_TIMEOUT_S = 30.0


class PeerFailure(RuntimeError):
    """The stage on the other side of a link failed: died, or sent an ERROR batch."""

    def __init__(self, peer: int, cause: str) -> None:
        super().__init__(f"stage {peer} (rank {peer}) failed: {cause}")
        self.peer = peer
        self.cause = cause

    def __reduce__(self) -> tuple[type[PeerFailure], tuple[int, str]]:
        return (PeerFailure, (self.peer, self.cause))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _LinkThread(threading.Thread):
    """Common ground: a daemon thread on the CUDA device of its stage, with a bounded join."""

    def __init__(self, name: str, peer: int, group: ProcessGroup, device: torch.device) -> None:
        super().__init__(name=name, daemon=True)
        self.peer = peer
        self.group = group
        self.device = device
        self.batches = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # the current device is per thread
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the stage
            self.error = exc
            self._on_failure(exc)

    def join(self, timeout: float | None = JOIN_TIMEOUT_S) -> None:
        """Join, but never forever: ``None`` means the default bound, not infinity."""
        super().join(JOIN_TIMEOUT_S if timeout is None else timeout)
        if self.is_alive():
            logger.warning("%s still blocked talking to rank %d; leaving it", self.name, self.peer)

    def _loop(self) -> None:
        raise NotImplementedError

    def _on_failure(self, exc: BaseException) -> None:
        raise NotImplementedError


class Receiver(_LinkThread):
    """Receives batches from the previous stage into ``inbox``; a full inbox blocks it."""

    def __init__(
        self, peer: int, group: ProcessGroup, device: torch.device, inbox: BatchBuffer
    ) -> None:
        super().__init__(f"receiver<-{peer}", peer, group, device)
        self.inbox = inbox
        self.bytes_received = 0
        self.seconds_waiting_on_put = 0.0

    def stats(self) -> dict[str, float | int]:
        return {
            "batches_received": self.batches,
            "bytes_received": self.bytes_received,
            "seconds_waiting_on_put": self.seconds_waiting_on_put,
        }

    def _loop(self) -> None:
        while True:
            batch = recv_batch(self.peer, self.group, self.device)
            self.batches += 1
            self.bytes_received += wire_bytes(batch)
            if batch.kind == Kind.ERROR:
                self.inbox.fail(PeerFailure(self.peer, batch.message or "sent an ERROR batch"))
                return
            try:
                # Blocking while the inbox is full is the backpressure: the peer's send
                # stays blocked because no recv is posted.
                self.seconds_waiting_on_put += self.inbox.put(batch)
            except BufferClosed:
                return  # the stage stopped reading on purpose
            if batch.kind == Kind.END:
                self.inbox.close()
                return

    def _on_failure(self, exc: BaseException) -> None:
        logger.debug("%s: receiving from rank %d failed: %s", self.name, self.peer, _describe(exc))
        self.inbox.fail(PeerFailure(self.peer, _describe(exc)))


class Sender(_LinkThread):
    """Sends the batches of ``outbox`` (fifo) to the next stage, until END or ERROR."""

    def __init__(
        self, peer: int, group: ProcessGroup, device: torch.device, outbox: BatchBuffer
    ) -> None:
        if outbox.policy != "fifo":
            raise ValueError(
                f"an outbox must be fifo: every batch is sent once, got {outbox.policy!r}"
            )
        super().__init__(f"sender->{peer}", peer, group, device)
        self.outbox = outbox
        self.bytes_sent = 0
        self.seconds_sending = 0.0

    def stats(self) -> dict[str, float | int]:
        return {
            "batches_sent": self.batches,
            "bytes_sent": self.bytes_sent,
            "seconds_sending": self.seconds_sending,
        }

    def _loop(self) -> None:
        while True:
            try:
                batch, _ = self.outbox.get()
            except BufferClosed:
                return  # closed without END: the stage decided there is nothing more
            except BaseException:  # noqa: BLE001
                return  # the stage failed its own outbox: it already knows why
            start = time.perf_counter()
            self.bytes_sent += send_batch(batch, self.peer, self.group, self.device)
            # On Gloo, send returns when the peer posts its recv: this includes waiting
            # for a downstream stage whose inbox is full.
            self.seconds_sending += time.perf_counter() - start
            self.batches += 1
            if batch.kind in (Kind.END, Kind.ERROR):
                return

    def _on_failure(self, exc: BaseException) -> None:
        logger.debug("%s: sending to rank %d failed: %s", self.name, self.peer, _describe(exc))
        self.outbox.fail(PeerFailure(self.peer, _describe(exc)))
