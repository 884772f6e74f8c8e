"""One link between two stages: a receiver thread into the inbox, a sender thread out."""

from __future__ import annotations

import logging
import threading
import time

from trgl_dist.metrics.spans import NullRecorder, Recorder
from trgl_dist.runtime.buffer import BatchBuffer, BufferClosed
from trgl_dist.runtime.planes import LinkEnd
from trgl_dist.runtime.wire import wire_bytes
from trgl_dist.training.items import Kind

logger = logging.getLogger(__name__)


class PeerFailure(RuntimeError):
    """The stage on the other side of a link (or a replica of this stage) failed: died, or
    sent an ERROR batch. ``peer`` is None when it cannot be told which of several it was."""

    def __init__(self, peer: int | None, cause: str, name: str = "") -> None:
        super().__init__(f"{name or f'stage {peer} (rank {peer})'} failed: {cause}")
        self.peer = peer
        self.cause = cause
        self.name = name

    def __reduce__(self) -> tuple[type[PeerFailure], tuple[int | None, str, str]]:
        return (PeerFailure, (self.peer, self.cause, self.name))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _LinkThread(threading.Thread):
    """Common ground: a daemon thread at one end of a link; its failure reaches the stage
    through the buffer it serves."""

    def __init__(
        self, name: str, end: LinkEnd, buffer: BatchBuffer, spans: Recorder | None = None
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.end = end
        self.buffer = buffer
        self.spans = spans or NullRecorder()
        self.peer = end.peer
        self.batches = 0
        self.bytes = 0
        self.seconds = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the stage
            self.error = exc
            logger.debug("%s: link to rank %d failed: %s", self.name, self.peer, _describe(exc))
            self.buffer.fail(PeerFailure(self.peer, _describe(exc), self.end.planes.peer_name))

    def join_until(self, timeout: float | None) -> bool:
        """Join for at most ``timeout`` seconds (None: until done); True once finished."""
        super().join(timeout)
        return not self.is_alive()

    def _loop(self) -> None:
        raise NotImplementedError


class Receiver(_LinkThread):
    """Receives batches from the previous stage into ``inbox``; a full inbox blocks it."""

    def __init__(self, end: LinkEnd, inbox: BatchBuffer, spans: Recorder | None = None) -> None:
        super().__init__(f"receiver<-{end.peer}", end, inbox, spans)

    def stats(self) -> dict[str, float | int]:
        return {
            "batches_received": self.batches,
            "bytes_received": self.bytes,
            "seconds_waiting_on_put": self.seconds,
        }

    def _loop(self) -> None:
        while True:
            batch = self.end.recv()
            self.spans.add("receive", f"receive from rank {self.peer}", self.end.header_at_ns,
                           time.time_ns(), step=batch.step)
            self.batches += 1
            self.bytes += wire_bytes(batch, self.end.wire)
            if batch.kind == Kind.ERROR:
                cause = batch.message or "sent an ERROR batch"
                self.buffer.fail(PeerFailure(self.peer, cause, self.end.planes.peer_name))
                return
            try:
                # Blocking while the inbox is full is the backpressure: the peer's send
                # stays blocked because no recv is posted.
                self.seconds += self.buffer.put(batch)
            except BufferClosed:
                return  # the stage stopped reading on purpose
            if batch.kind == Kind.END:
                self.buffer.close()
                return


class Sender(_LinkThread):
    """Sends the batches of ``outbox`` (fifo) to the next stage, until END or ERROR."""

    def __init__(self, end: LinkEnd, outbox: BatchBuffer, spans: Recorder | None = None) -> None:
        if outbox.policy != "fifo":
            raise ValueError(
                f"an outbox must be fifo: every batch is sent once, got {outbox.policy!r}"
            )
        super().__init__(f"sender->{end.peer}", end, outbox, spans)

    def stats(self) -> dict[str, float | int]:
        return {
            "batches_sent": self.batches,
            "bytes_sent": self.bytes,
            "seconds_sending": self.seconds,
        }

    def _loop(self) -> None:
        while True:
            try:
                batch, _ = self.buffer.get()
            except BufferClosed:
                return  # closed without END: the stage decided there is nothing more
            except BaseException:  # noqa: BLE001
                return  # the stage failed its own outbox: it already knows why
            start = time.perf_counter()
            with self.spans.span("send", f"send to rank {self.peer}", step=batch.step):
                self.bytes += self.end.send(batch)
            # On Gloo, send returns when the peer posts its recv: this includes waiting
            # for a downstream stage whose inbox is full.
            self.seconds += time.perf_counter() - start
            self.batches += 1
            if batch.kind in (Kind.END, Kind.ERROR):
                return
