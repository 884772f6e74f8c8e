"""The process groups of a layout: both planes of every link and each stage's replica group.

Every rank creates every group, in one order (new_group is collective over the world);
topology.py calls these once, from init_distributed, after the control world exists.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch.distributed import ProcessGroup

from trgl_dist.runtime import strict

if TYPE_CHECKING:
    from trgl_dist.runtime.topology import Topology


@dataclass(frozen=True)
class Placement:
    """Where a rank runs: its node (torchrun's GROUP_RANK), its GPU (-1: none), its pid."""

    node: int
    gpu: int
    pid: int

    def shares_gpu_with(self, other: Placement) -> bool:
        return self.gpu >= 0 and (self.node, self.gpu) == (other.node, other.gpu)


@dataclass(frozen=True)
class LinkPlanes:
    """The two groups of one link, seen from one of its ends."""

    peer: int
    control: ProcessGroup  # Gloo, CPU tensors only
    payload: ProcessGroup  # NCCL (device tensors), or Gloo
    via_host: bool  # on GPU: activations travel through pinned host memory over Gloo
    peer_name: str = ""  # how people name the peer: "stage 1 (rank 1)"


def new_group(
    ranks: list[int] | None, backend: str, timeout: datetime.timedelta, carries: str, name: str
) -> ProcessGroup | None:
    """new_group is collective over the world: every rank creates every group, in the same
    order, even those it is not part of (it gets a sentinel, returned here as None).
    ``carries`` is "host" or "device": what the strict mode lets travel on it."""
    group = dist.new_group(ranks=ranks, timeout=timeout, backend=backend)
    if not isinstance(group, ProcessGroup):
        return None
    strict.register(group, carries, name)
    return group


def payload_backend(topology: Topology, placements: Sequence[Placement]) -> tuple[str, bool]:
    """(backend, through host memory) for a group of these ranks: NCCL needs each on its own
    GPU; two ranks on one GPU go through pinned host memory over Gloo."""
    shared = any(
        a.shares_gpu_with(b) for n, a in enumerate(placements) for b in placements[n + 1 :]
    )
    on_gpu = topology.device.type == "cuda" and not shared
    return ("nccl" if on_gpu else "gloo"), shared


def build_links(
    topology: Topology,
    placements: tuple[Placement, ...],
    link_timeout: datetime.timedelta,
    control_timeout: datetime.timedelta,
) -> tuple[tuple[LinkPlanes, ...], tuple[LinkPlanes, ...]]:
    """Both planes of every link of the layout; this rank's (inbound, outbound) links, each
    in the order of the peer's replica index."""
    inbound, outbound = [], []
    for sender, receiver in topology.plan.links():
        pair = [sender, receiver]
        backend, via_host = payload_backend(topology, [placements[sender], placements[receiver]])
        name = f"link {sender}->{receiver}"
        control = new_group(pair, "gloo", control_timeout, "host", f"the control plane of {name}")
        payload = new_group(
            pair,
            backend,
            link_timeout,
            "host" if via_host else "device",
            f"the payload plane of {name}",
        )
        if control is None or payload is None:
            continue  # this rank is not an end of the link
        if topology.rank == sender:
            name = topology.plan.describe(receiver)
            outbound.append(LinkPlanes(receiver, control, payload, via_host, name))
        else:
            name = topology.plan.describe(sender)
            inbound.append(LinkPlanes(sender, control, payload, via_host, name))
    return tuple(inbound), tuple(outbound)


def build_replica_groups(
    topology: Topology, placements: tuple[Placement, ...], timeout: datetime.timedelta
) -> tuple[ProcessGroup | None, bool]:
    """One group per replicated stage, on the payload backend (its gradients are averaged
    there); this rank's (None without replicas), and whether it goes through host memory."""
    mine, mine_via_host = None, False
    layout = topology.plan
    for stage, count in enumerate(layout.replicas):
        if count < 2:
            continue
        ranks = [layout.rank_of(stage, i) for i in range(count)]
        backend, via_host = payload_backend(topology, [placements[r] for r in ranks])
        carries = "host" if via_host else "device"
        group = new_group(ranks, backend, timeout, carries, f"the replicas of stage {stage}")
        if group is not None:
            mine, mine_via_host = group, via_host
    return mine, mine_via_host


