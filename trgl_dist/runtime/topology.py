"""Who this process is in the pipeline: the only module touching torch.distributed set-up."""

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

logger = logging.getLogger(__name__)

# destroy_process_group has not been seen to hang on Gloo, but a teardown must never be
# the reason a failed job lingers: give it this long, then let the process exit anyway.
SHUTDOWN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Topology:
    """This rank's place in the chain of stages: stage r runs on rank r."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    # link_groups[r] is the dedicated group of the link r -> r+1, None where this rank is not
    # a member; empty when not distributed.
    link_groups: tuple[ProcessGroup | None, ...] = field(default=(), compare=False, repr=False)

    @property
    def stage(self) -> int:
        return self.rank

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
    def prev_rank(self) -> int | None:
        return None if self.is_first else self.rank - 1

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last else self.rank + 1

    def inbound_group(self) -> ProcessGroup:
        """The group of the link prev -> self (raises on the first stage)."""
        if self.prev_rank is None:
            raise ValueError(f"stage {self.stage} is the first stage: it has no inbound link")
        return self._link_group(self.prev_rank)

    def outbound_group(self) -> ProcessGroup:
        """The group of the link self -> next (raises on the last stage)."""
        if self.next_rank is None:
            raise ValueError(f"stage {self.stage} is the last stage: it has no outbound link")
        return self._link_group(self.rank)

    def _link_group(self, sender_rank: int) -> ProcessGroup:
        if len(self.link_groups) != self.world_size - 1:
            raise RuntimeError("link groups are missing: build the topology with init_distributed")
        group = self.link_groups[sender_rank]
        if group is None:
            raise RuntimeError(f"rank {self.rank} is not a member of link {sender_rank}")
        return group


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def from_env() -> Topology:
    """Topology from torchrun's RANK, LOCAL_RANK and WORLD_SIZE (default: one process).

    No process group is created: the link groups are empty (see :func:`init_distributed`).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank} WORLD_SIZE={world_size}")
    backend, device = _backend_and_device(local_rank)
    return Topology(rank, world_size, local_rank, backend, device)


def _backend_and_device(local_rank: int) -> tuple[str, torch.device]:
    if torch.cuda.is_available():
        return "nccl", torch.device("cuda", local_rank)
    return "gloo", torch.device("cpu")


def init_distributed(timeout_s: float = 1800.0, init_method: str | None = None) -> Topology:
    """Join the process group and build one dedicated group per link r -> r+1.

    NCCL when CUDA is available (device cuda:LOCAL_RANK), else Gloo on CPU. A single
    process (WORLD_SIZE=1) creates no process group at all. ``init_method`` defaults to
    torchrun's ``env://``; tests pass a ``file://`` store.

    The NCCL path is written for GPUs but untested here (no GPU on the development
    machine). NCCL does not notice a dead peer on its own: run with
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (torchrun's default in recent torch) so a hung
    collective is aborted after ``timeout_s``.
    """
    topology = from_env()
    if not topology.is_distributed:
        return topology
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized; call shutdown() first")
    if topology.backend == "nccl":
        # The current CUDA device is per thread: set it before NCCL binds a communicator.
        torch.cuda.set_device(topology.device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend=topology.backend,
        init_method=init_method,
        timeout=timeout,
        world_size=topology.world_size,
        rank=topology.rank,
        device_id=topology.device if topology.backend == "nccl" else None,
    )
    groups = tuple(
        _new_link_group(r, topology.backend, timeout) for r in range(topology.world_size - 1)
    )
    logger.info(
        "[stage %d] joined %s group of %d ranks on %s",
        topology.stage,
        topology.backend,
        topology.world_size,
        topology.device,
    )
    return dataclasses.replace(topology, link_groups=groups)


def _new_link_group(
    sender_rank: int, backend: str, timeout: datetime.timedelta
) -> ProcessGroup | None:
    """The group of link sender_rank -> sender_rank+1.

    new_group is collective over the whole world: every rank calls this for every link,
    in the same order, even for links it is not part of. A separate group per link means
    the sender thread and the receiver thread of a stage never share a (group, peer, tag)
    channel, which Gloo forbids (it aborts the process).
    """
    group = dist.new_group(ranks=[sender_rank, sender_rank + 1], timeout=timeout, backend=backend)
    # Non-members get a sentinel instead of a group: keep None, they never use the link.
    return group if isinstance(group, ProcessGroup) else None


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
