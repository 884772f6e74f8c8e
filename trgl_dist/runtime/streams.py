"""CUDA streams and events between a stage's compute thread and its link threads.

On GPU, NCCL's ``send``/``recv`` make the *current stream* wait, not the host: sharing the
compute stream with the links would stall compute behind every posted recv. So each link
thread has a stream of its own:
- the compute thread records an event when it hands a batch to the outbox;
- the sender waits on that event on its own stream, sends, and synchronizes its stream
  before it lets go of the batch (so the memory is not reused while NCCL reads it);
- the receiver receives on its own stream and synchronizes it before the batch enters the
  inbox;
- the compute thread marks what it takes from the inbox as used by its stream
  (``record_stream``), so the allocator does not hand that memory to the next recv while
  compute still reads it.
On CPU every method is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from trgl_dist.runtime import strict
from trgl_dist.training.items import Batch


class DeviceStreams:
    """The streams of one stage's threads; a no-op on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def handoff(self, batch: Batch) -> Batch:
        """Compute thread: the batch is complete once the work queued so far is done."""
        if batch.x is not None:
            strict.device_tensor(batch.x)
            if self.cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                batch.ready = event
        return batch

    def new_stream(self) -> Any:
        """A stream for one link thread (None on CPU)."""
        return torch.cuda.Stream(self.device) if self.cuda else None

    @contextlib.contextmanager
    def sending(self, stream: Any, batch: Batch) -> Iterator[None]:
        """Sender thread: wait for the batch's event on ``stream``, send inside, then wait
        for the stream so the batch's memory may be released."""
        if not self.cuda:
            yield
            return
        torch.cuda.set_device(self.device)  # the current device is per thread
        with torch.cuda.stream(stream):
            if batch.ready is not None:
                stream.wait_event(batch.ready)
            yield
        stream.synchronize()

    def sync(self, stream: Any) -> None:
        """Wait for the work queued on ``stream`` (before the host reads what it wrote)."""
        if self.cuda:
            stream.synchronize()

    @contextlib.contextmanager
    def receiving(self, stream: Any) -> Iterator[None]:
        """Receiver thread: receive (and copy) on ``stream``, then wait for it, so the batch
        is complete when it enters the inbox."""
        if not self.cuda:
            yield
            return
        torch.cuda.set_device(self.device)
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()

    def adopt(self, batch: Batch) -> Batch:
        """Compute thread: tensors that arrived on a link stream are now used by compute."""
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            for t in (batch.x, batch.y, batch.ids):
                if t is not None and t.is_cuda:
                    t.record_stream(stream)
        return batch
