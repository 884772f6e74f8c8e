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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from trgl_dist.errors import UserError
from trgl_dist.layout import Layout, LayoutError
from trgl_dist.runtime import strict
from trgl_dist.runtime.groups import (
    LinkPlanes,
    Placement,
    build_links,
    build_replica_groups,
    new_group,
)

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
class Topology:
    """This rank's place in the chain of stages: its stage and replica (see layout.py), its
    links to the replicas of the stages before and after, and its stage's replica group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1
    layout: Layout | None = None  # None: one replica per stage
    placements: tuple[Placement, ...] = field(default=(), compare=False)
    control_world: ProcessGroup | None = field(default=None, compare=False, repr=False)
    inbound_links: tuple[LinkPlanes, ...] = field(default=(), compare=False, repr=False)
    outbound_links: tuple[LinkPlanes, ...] = field(default=(), compare=False, repr=False)
    # The replicas of this stage, on the payload backend (None with one replica); through
    # host memory when two of them share a GPU.
    replica_group: ProcessGroup | None = field(default=None, compare=False, repr=False)
    replica_via_host: bool = False

    @property
    def plan(self) -> Layout:
        return self.layout or Layout((1,) * self.world_size)

    @property
    def stage(self) -> int:
        return self.plan.place(self.rank)[0]

    @property
    def replica(self) -> int:
        return self.plan.place(self.rank)[1]

    @property
    def replicas(self) -> int:
        """How many replicas this rank's stage has."""
        return self.plan.replicas[self.stage]

    @property
    def num_stages(self) -> int:
        return self.plan.num_stages

    @property
    def where(self) -> str:
        """How people name this rank: "stage 1 (rank 1)" or "stage 0 replica 1 (rank 1)"."""
        return self.plan.describe(self.rank)

    @property
    def inbound(self) -> LinkPlanes | None:
        return self.inbound_links[0] if len(self.inbound_links) == 1 else None

    @property
    def outbound(self) -> LinkPlanes | None:
        return self.outbound_links[0] if len(self.outbound_links) == 1 else None

    @property
    def backend(self) -> str:
        """The payload backend between two GPUs: nccl on GPU, gloo on CPU."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def is_first(self) -> bool:
        """On the first stage: it draws the data."""
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_multinode(self) -> bool:
        return self.local_world_size < self.world_size

    @property
    def prev_rank(self) -> int | None:
        """The rank before this one on a chain of single replicas."""
        return None if self.is_first else self.rank - 1

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last else self.rank + 1

    def inbound_link(self) -> LinkPlanes:
        """The one inbound link of a stage with a single upstream replica."""
        if self.is_first:
            raise ValueError(f"stage {self.stage} is the first stage: it has no inbound link")
        return _one(self.inbound_links)

    def outbound_link(self) -> LinkPlanes:
        """The one outbound link of a stage with a single downstream replica."""
        if self.is_last:
            raise ValueError(f"stage {self.stage} is the last stage: it has no outbound link")
        return _one(self.outbound_links)


def _one(links: tuple[LinkPlanes, ...]) -> LinkPlanes:
    if not links:
        raise RuntimeError("link groups are missing: build the topology with init_distributed")
    if len(links) > 1:
        raise RuntimeError(f"{len(links)} links here: use the tuple of links")
    return links[0]


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
    link_timeout_s: float = DEFAULT_LINK_TIMEOUT_S,
    init_method: str | None = None,
    replicas: Sequence[int] = (),
    choose_layout: Callable[[Topology], Layout] | None = None,
) -> Topology:
    """Join the process group and build the two planes of every link between replicas of
    consecutive stages that exchange batches, and each stage's replica group.

    ``replicas`` are the replica counts per stage (``--stage-replicas``; see layout.py).
    ``choose_layout``, when given, decides the layout instead, once every rank has joined:
    it gets a topology with the control world (and a layout of one replica per stage) and
    must return the same layout on every rank.

    A single process (WORLD_SIZE=1) creates no process group at all. ``init_method``
    defaults to torchrun's ``env://``; tests pass a ``file://`` store. ``link_timeout_s``
    bounds a payload transfer, which is posted only once its header has arrived. Open the
    payload planes with ``planes.warm_links`` before any thread uses them.
    """
    topology = from_env()
    if not topology.is_distributed:
        return topology
    try:
        layout = Layout.for_world(topology.world_size, () if choose_layout else replicas)
    except LayoutError as err:
        raise TopologyError(str(err)) from None
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
    control_world = new_group(None, "gloo", control_timeout, "host", "the control world group")
    placements = _gather_placements(topology, control_world)
    topology = dataclasses.replace(topology, placements=placements, control_world=control_world)
    if choose_layout is not None:
        layout = choose_layout(topology)
    topology = dataclasses.replace(topology, layout=layout)
    payload_timeout = datetime.timedelta(seconds=link_timeout_s)
    inbound, outbound = build_links(topology, placements, payload_timeout, control_timeout)
    replica_group, replica_via_host = build_replica_groups(topology, placements, payload_timeout)
    topology = dataclasses.replace(
        topology,
        inbound_links=inbound,
        outbound_links=outbound,
        replica_group=replica_group,
        replica_via_host=replica_via_host,
    )
    _warn_about_shared_gpus(topology)
    logger.info(
        "[%s] joined %d ranks on %s; activations %s",
        topology.where,
        topology.world_size,
        topology.device,
        _transports(topology),
    )
    return topology


def _transports(topology: Topology) -> str:
    """How this rank's links carry activations, for the start-up line."""
    ends = [
        f"{direction} from rank {link.peer} over "
        f"{'gloo via host memory' if link.via_host else topology.backend}"
        for direction, links in (("in", topology.inbound_links), ("out", topology.outbound_links))
        for link in links
    ]
    return ", ".join(ends) or "none"


def _gather_placements(topology: Topology, control: ProcessGroup | None) -> tuple[Placement, ...]:
    node = _env_int("GROUP_RANK", 0)
    gpu = topology.device.index if topology.device.type == "cuda" else -1
    mine = torch.tensor([node, -1 if gpu is None else gpu, os.getpid()], dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(topology.world_size)]
    dist.all_gather(every, mine, group=control)
    return tuple(Placement(*(int(v) for v in t.tolist())) for t in every)


def _warn_about_shared_gpus(topology: Topology) -> None:
    """One line, from the sending end of each link whose two ends share a GPU."""
    for link in topology.outbound_links:
        if link.via_host:
            logger.warning(
                "[%s] ranks %d and %d share %s: their activations go through pinned host "
                "memory over Gloo (NCCL refuses two ranks on one GPU)",
                topology.where,
                topology.rank,
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
