"""The ranks' end of the metrics channel: signed records pushed over pyzmq, never blocking.

A message is three frames: the sending rank, an HMAC-SHA256 of (rank, payload) under the
run's secret, and the payload (a JSON record; for a heartbeat, "@" and the rank's wall
clock in ns, from which the coordinator estimates the rank's clock offset). The coordinator
drops any message whose signature does not check, so only the run's own ranks are heard.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time

import zmq

from trgl_dist.metrics.records import Record, encode

logger = logging.getLogger(__name__)

#: A heartbeat's payload starts with this byte (a record is a JSON object: "{").
HEARTBEAT = b"@"
# The coordinator refuses bigger messages (zmq MAXMSGSIZE); a record is a few hundred bytes.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20


def signature(secret: bytes, rank: bytes, payload: bytes) -> bytes:
    """HMAC-SHA256 of the rank frame and the payload under the run's secret."""
    return hmac.new(secret, rank + b"\0" + payload, hashlib.sha256).digest()


class MetricsClient:
    """PUSH records to the coordinator; a full queue drops and counts, it never waits.

    Thread-safe (a lock guards the socket), so a stage's worker threads may report too.
    """

    def __init__(
        self,
        address: str,
        *,
        rank: int,
        secret: bytes,
        hwm: int = 10000,
        linger_ms: int = 2000,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        self.max_message_bytes = max_message_bytes
        self.sent = self.dropped = self.oversized = 0
        self._rank = str(rank).encode()
        self._secret = secret
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

    def send(self, rec: Record) -> bool:
        """Queue one record; False (and counted) if it is too big or the queue is full."""
        payload = encode(rec).encode("utf-8")
        if len(payload) > self.max_message_bytes:
            # The coordinator would drop the connection for it: refuse it here instead.
            with self._lock:
                self.oversized += 1
                if self.oversized == 1:
                    logger.warning(
                        "metrics record of %d bytes (kind %r) exceeds %d bytes: not sent",
                        len(payload),
                        rec.kind,
                        self.max_message_bytes,
                    )
            return False
        return self._push(payload)

    def heartbeat(self) -> bool:
        """Say "still here", with this rank's clock: the coordinator watches for silent
        ranks and corrects the timeline trace by each rank's clock offset."""
        return self._push(HEARTBEAT + str(time.time_ns()).encode())

    def _push(self, payload: bytes) -> bool:
        frames = [self._rank, signature(self._secret, self._rank, payload), payload]
        with self._lock:
            if self._closed:
                self.dropped += 1
                return False
            try:
                self._socket.send_multipart(frames, zmq.NOBLOCK)
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
