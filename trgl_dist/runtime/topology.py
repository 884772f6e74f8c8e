"""Who this process is in the pipeline: the only module touching torch.distributed set-up.

Every link between two stages has two planes, each its own process group:
- the control plane (headers, labels, sample ids, END and ERROR) is always Gloo on CPU
  tensors, so a dead peer is noticed there whatever carries the activations;
- the payload plane (activations) is NCCL between two GPUs, and Gloo otherwise: on CPU,
  and through pinned host memory when both ends share one GPU (NCCL refuses two ranks of
  one communicator on one device).
The default process group carries nothing: a CPU tensor on it would be refused by NCCL.
Run-wide control traffic (the run directory, an agreed split) uses ``control_world``, a
Gloo group of every rank.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from trgl_dist.errors import UserError
from trgl_dist.runtime import strict

logger = logging.getLogger(__name__)

# destroy_process_group has not been seen to hang on Gloo, but a teardown must never be
# the reason a failed job lingers: give it this long, then let the process exit anyway.
SHUTDOWN_TIMEOUT_S = 10.0
#: Timeout of the control plane's Gloo groups. A control recv waits for the next batch,
#: which has no bound (an upstream test pass, a checkpoint); a frozen peer is caught by the
#: heartbeats instead (runtime/watchdog.py). This only ends a wait that nothing else ends.
CONTROL_TIMEOUT_S = 1800.0
DEFAULT_LINK_TIMEOUT_S = 60.0


class TopologyError(UserError, RuntimeError):
    """The launcher's environment cannot be run as a pipeline; the message says why."""


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


@dataclass(frozen=True)
class Topology:
    """This rank's place in the chain of stages: stage r runs on rank r."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1
    placements: tuple[Placement, ...] = field(default=(), compare=False)
    control_world: ProcessGroup | None = field(default=None, compare=False, repr=False)
    inbound: LinkPlanes | None = field(default=None, compare=False, repr=False)
    outbound: LinkPlanes | None = field(default=None, compare=False, repr=False)

    @property
    def stage(self) -> int:
        return self.rank

    @property
    def backend(self) -> str:
        """The payload backend between two GPUs: nccl on GPU, gloo on CPU."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_multinode(self) -> bool:
        return self.local_world_size < self.world_size

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first else self.rank - 1

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last else self.rank + 1

    def inbound_link(self) -> LinkPlanes:
        """The planes of the link prev -> self (raises on the first stage)."""
        if self.is_first:
            raise ValueError(f"stage {self.stage} is the first stage: it has no inbound link")
        return _built(self.inbound)

    def outbound_link(self) -> LinkPlanes:
        """The planes of the link self -> next (raises on the last stage)."""
        if self.is_last:
            raise ValueError(f"stage {self.stage} is the last stage: it has no outbound link")
        return _built(self.outbound)


def _built(link: LinkPlanes | None) -> LinkPlanes:
    if link is None:
        raise RuntimeError("link groups are missing: build the topology with init_distributed")
    return link


def _env_int(name: str, default: int | None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise TopologyError(f"environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise TopologyError(
            f"environment variable {name} must be an integer, got {raw!r}"
        ) from None


def from_env() -> Topology:
    """Topology from torchrun's RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (default:
    one process). No process group is created (see :func:`init_distributed`)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise TopologyError(
            f"need 0 <= RANK < WORLD_SIZE, got RANK={rank} WORLD_SIZE={world_size}"
        )
    local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
    # The GPU index comes from LOCAL_RANK only: RANK is global, an invalid index on node 2.
    local_rank = _env_int("LOCAL_RANK", 0 if world_size == 1 else None)
    if not 0 <= local_rank < max(local_world, 1):
        raise TopologyError(
            f"need 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE, got {local_rank} and {local_world}"
        )
    return Topology(rank, world_size, local_rank, device_for(local_rank), local_world)


def device_for(local_rank: int) -> torch.device:
    """cuda:(LOCAL_RANK mod GPUs) when there are GPUs (more ranks than GPUs share them), else
    the CPU. Neighbouring local ranks land on different GPUs whenever there are two or more."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count < 1:
        raise TopologyError("CUDA is available but no GPU is visible (CUDA_VISIBLE_DEVICES?)")
    return torch.device("cuda", local_rank % count)


def init_distributed(
    link_timeout_s: float = DEFAULT_LINK_TIMEOUT_S, init_method: str | None = None
) -> Topology:
    """Join the process group and build the two planes of every link r -> r+1.

    A single process (WORLD_SIZE=1) creates no process group at all. ``init_method``
    defaults to torchrun's ``env://``; tests pass a ``file://`` store. ``link_timeout_s``
    bounds a payload transfer, which is posted only once its header has arrived. Open the
    payload planes with ``planes.warm_links`` before any thread uses them.
    """
    topology = from_env()
    if not topology.is_distributed:
        return topology
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized; call shutdown() first")
    cuda = topology.device.type == "cuda"
    if cuda:
        # NCCL aborts a hung operation at its timeout only with async error handling on
        # (torchrun sets it; a launch without torchrun gets it here).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(topology.device)  # the current device is per thread
    control_timeout = datetime.timedelta(seconds=CONTROL_TIMEOUT_S)
    # No device_id: no eager NCCL communicator over all ranks, which ranks sharing a GPU
    # could not form. The default group is never used for data (see the module docstring).
    dist.init_process_group(
        backend="cpu:gloo,cuda:nccl" if cuda else "gloo",
        init_method=init_method,
        timeout=control_timeout,
        world_size=topology.world_size,
        rank=topology.rank,
    )
    strict.install_if_enabled(topology.device)
    control_world = _new_group(None, "gloo", control_timeout, "host", "the control world group")
    placements = _gather_placements(topology, control_world)
    links = _build_links(topology, placements, datetime.timedelta(seconds=link_timeout_s))
    topology = dataclasses.replace(
        topology,
        placements=placements,
        control_world=control_world,
        inbound=links.get(topology.rank - 1),
        outbound=links.get(topology.rank),
    )
    _warn_about_shared_gpus(topology)
    logger.info(
        "[stage %d] joined %d ranks on %s; activations %s",
        topology.stage,
        topology.world_size,
        topology.device,
        _transports(topology),
    )
    return topology


def _transports(topology: Topology) -> str:
    """How this rank's links carry activations, for the start-up line."""
    ends = [
        f"{direction} over {'gloo via host memory' if link.via_host else topology.backend}"
        for direction, link in (("in", topology.inbound), ("out", topology.outbound))
        if link is not None
    ]
    return ", ".join(ends) or "none"


def _new_group(
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


def _gather_placements(topology: Topology, control: ProcessGroup | None) -> tuple[Placement, ...]:
    node = _env_int("GROUP_RANK", 0)
    gpu = topology.device.index if topology.device.type == "cuda" else -1
    mine = torch.tensor([node, -1 if gpu is None else gpu, os.getpid()], dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(topology.world_size)]
    dist.all_gather(every, mine, group=control)
    return tuple(Placement(*(int(v) for v in t.tolist())) for t in every)


def _build_links(
    topology: Topology, placements: tuple[Placement, ...], link_timeout: datetime.timedelta
) -> dict[int, LinkPlanes]:
    """Both planes of every link, keyed by the sending rank; only this rank's are kept."""
    control_timeout = datetime.timedelta(seconds=CONTROL_TIMEOUT_S)
    links = {}
    for sender in range(topology.world_size - 1):
        pair = [sender, sender + 1]
        via_host = placements[sender].shares_gpu_with(placements[sender + 1])
        on_gpu = topology.device.type == "cuda" and not via_host
        name = f"link {sender}->{sender + 1}"
        control = _new_group(pair, "gloo", control_timeout, "host", f"the control plane of {name}")
        payload = _new_group(
            pair,
            "nccl" if on_gpu else "gloo",
            link_timeout,
            "host" if via_host else "device",
            f"the payload plane of {name}",
        )
        if control is None or payload is None:
            continue  # this rank is not an end of the link
        peer = sender + 1 if topology.rank == sender else sender
        links[sender] = LinkPlanes(peer, control, payload, via_host)
    return links


def _warn_about_shared_gpus(topology: Topology) -> None:
    """One line, from the sending end of each link whose two stages share a GPU."""
    link = topology.outbound
    if link is not None and link.via_host:
        logger.warning(
            "[stage %d] stages %d and %d share %s: their activations go through pinned host "
            "memory over Gloo (NCCL refuses two ranks on one GPU)",
            topology.stage,
            topology.stage,
            link.peer,
            topology.device,
        )


def shutdown() -> None:
    """Destroy the process group if there is one; bounded in time, never raises."""
    if not dist.is_available() or not dist.is_initialized():
        return
    teardown = threading.Thread(target=_destroy_quietly, name="trgl-shutdown", daemon=True)
    teardown.start()
    teardown.join(SHUTDOWN_TIMEOUT_S)
    if teardown.is_alive():
        logger.warning("destroy_process_group did not finish in %.0f s", SHUTDOWN_TIMEOUT_S)


def _destroy_quietly() -> None:
    try:
        dist.destroy_process_group()
    except Exception:  # teardown after a failure: the original error is what matters
        logger.exception("destroy_process_group failed")
