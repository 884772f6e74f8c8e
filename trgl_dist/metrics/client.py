"""The stages' end of the metrics channel: JSON records pushed over pyzmq, never blocking."""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Any

import zmq

from trgl_dist.metrics.runlog import encode_record

logger = logging.getLogger(__name__)

# The coordinator refuses bigger messages (zmq MAXMSGSIZE); a record is a few hundred bytes.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20


class MetricsClient:
    """PUSH records to the coordinator; a full queue drops and counts, it never waits.

    Thread-safe (a lock guards the socket), so a stage's worker threads may report too.
    """

    def __init__(
        self,
        address: str,
        hwm: int = 10000,
        *,
        linger_ms: int = 2000,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        self.max_message_bytes = max_message_bytes
        self.sent = 0
        self.dropped = 0
        self.oversized = 0
        self._linger_ms = linger_ms
        self._lock = threading.Lock()
        self._closed = False
        # An own context, not Context.instance(): a shared one would not survive a fork.
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        # Bounded linger: close() must not hang when the coordinator is gone.
        self._socket.setsockopt(zmq.LINGER, linger_ms)
        self._socket.connect(address)

    def send(self, rec: dict[str, Any]) -> bool:
        """Queue one record; False (and counted) if it is too big or the queue is full."""
        payload = encode_record(rec).encode("utf-8")
        with self._lock:
            if len(payload) > self.max_message_bytes:
                # The coordinator would drop the connection for it: refuse it here instead.
                self.oversized += 1
                if self.oversized == 1:
                    logger.warning(
                        "metrics record of %d bytes (kind %r) exceeds %d bytes: not sent",
                        len(payload),
                        rec.get("kind"),
                        self.max_message_bytes,
                    )
                return False
            if self._closed:
                self.dropped += 1
                return False
            try:
                self._socket.send(payload, zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += 1
                return False
            self.sent += 1
            return True

    def close(self) -> None:
        """Flush queued records for at most linger_ms, then release the socket."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._socket.close(linger=self._linger_ms)
            self._context.term()
        if self.dropped or self.oversized:
            logger.warning(
                "metrics: %d records dropped (queue full), %d too big", self.dropped, self.oversized
            )

    def __enter__(self) -> MetricsClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
