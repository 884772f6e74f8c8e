"""One end of a link: a batch sent or received over the link's two planes.

The control message goes over the control plane (Gloo, CPU); the activations over the
payload plane: NCCL between two GPUs (on the link thread's own stream), Gloo on CPU, or
Gloo through pinned host memory when the two stages share a GPU.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from trgl_dist.runtime import strict
from trgl_dist.runtime.streams import DeviceStreams
from trgl_dist.runtime.topology import LinkPlanes, Topology
from trgl_dist.runtime.wire import WireFormat, wire_bytes
from trgl_dist.training.items import Batch


def payload_buffer(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, via_host: bool
) -> Tensor:
    """Where a payload is received (or staged for sending): on the stage's device, or in
    pinned host memory for a link through the host."""
    if via_host:
        return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())
    return strict.device_tensor(torch.empty(shape, dtype=dtype, device=device))


def warm_links(topology: Topology) -> None:
    """Open every payload plane (and the replica group) from the main thread, link by link
    along the chain.

    NCCL creates a communicator on its first use; two threads of one process each first
    using their own communicator can deadlock in that set-up. Here each rank first receives
    on its inbound links, then sends on its outbound ones, each in the order of its peers'
    ranks, so the chain opens in one order every rank agrees on.
    """
    for link in topology.inbound_links:
        buffer = payload_buffer((1,), torch.float32, topology.device, link.via_host)
        dist.recv(buffer, src=link.peer, group=link.payload)
    for link in topology.outbound_links:
        buffer = payload_buffer((1,), torch.float32, topology.device, link.via_host)
        dist.send(buffer.fill_(1.0), dst=link.peer, group=link.payload)
    if topology.replica_group is not None:
        device = torch.device("cpu") if topology.replica_via_host else topology.device
        probe = torch.ones(1, device=device)
        if not topology.replica_via_host:
            strict.device_tensor(probe)
        dist.all_reduce(probe, group=topology.replica_group)


class LinkEnd:
    """This rank's end of one link: the planes, the wire format and a link thread's stream.

    Used by one thread only (a sender or a receiver): Gloo aborts the process when two
    threads use one (group, peer, tag) channel at once.
    """

    def __init__(
        self, planes: LinkPlanes, wire: WireFormat, device: torch.device, streams: DeviceStreams
    ) -> None:
        self.planes, self.wire, self.device, self.streams = planes, wire, device, streams
        self.peer = planes.peer
        self.control = wire.new_buffer()  # reused: a Gloo send or recv returns when done
        self.stream: Any = None  # created in the thread that uses it
        self.header_at_ns = 0  # when the last received batch's control message arrived

    def send(self, batch: Batch) -> int:
        """Send ``batch`` to the peer; returns the bytes sent. Blocking: on Gloo a send
        returns once the peer has posted its recv, which is the pipeline's backpressure."""
        self.wire.encode(batch, self.control)
        # torch 2.14: ``dst`` is the GLOBAL rank (``group_dst`` would be the in-group rank).
        dist.send(self.control, dst=self.peer, group=self.planes.control)
        if batch.x is not None:
            if self.stream is None:
                self.stream = self.streams.new_stream()
            with self.streams.sending(self.stream, batch):
                dist.send(self._outgoing(batch.x), dst=self.peer, group=self.planes.payload)
        return wire_bytes(batch, self.wire)

    def _outgoing(self, x: Tensor) -> Tensor:
        if self.planes.via_host:
            host = payload_buffer(tuple(x.shape), x.dtype, self.device, via_host=True)
            host.copy_(x, non_blocking=True)
            self.streams.sync(self.stream)  # Gloo reads host memory: the copy must be done
            return host
        return x if x.is_contiguous() else strict.device_tensor(x.contiguous())

    def recv(self) -> Batch:
        """The next batch from the peer (blocking). Its tensors are on the stage's device
        and complete: the payload recv was posted after its control message, on this
        thread's stream, which is synchronized before returning."""
        dist.recv(self.control, src=self.peer, group=self.planes.control)
        self.header_at_ns = time.time_ns()  # the transfer starts; before, the link was idle
        header, y, ids, message = self.wire.decode(self.control)
        x = None
        if self.stream is None:
            self.stream = self.streams.new_stream()
        with self.streams.receiving(self.stream):
            if header.dtype is not None:
                via_host = self.planes.via_host
                buffer = payload_buffer(header.shape, header.dtype, self.device, via_host)
                dist.recv(buffer, src=self.peer, group=self.planes.payload)
                x = buffer.to(self.device, non_blocking=True) if self.planes.via_host else buffer
            if self.device.type == "cuda":
                y = None if y is None else y.to(self.device, non_blocking=True)
                ids = None if ids is None else ids.to(self.device, non_blocking=True)
        return Batch(header.kind, header.step, header.epoch, x, y, ids, message)
