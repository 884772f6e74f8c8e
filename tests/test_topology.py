"""Topology: torchrun environment, roles, the two planes of every link, and NCCL's device rules."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_workers
from trgl_dist.runtime import strict
from trgl_dist.runtime import topology as topo
from trgl_dist.runtime.planes import payload_buffer
from trgl_dist.runtime.topology import Placement, Topology, TopologyError

CPU = torch.device("cpu")
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_from_env_defaults_to_one_process(clean_env: pytest.MonkeyPatch) -> None:
    topology = topo.from_env()
    assert (topology.rank, topology.world_size, topology.local_rank) == (0, 1, 0)
    assert topology.is_first and topology.is_last and not topology.is_distributed
    assert topology.prev_rank is None and topology.next_rank is None
    assert (topology.backend, topology.device) == ("gloo", CPU)  # no GPU on this machine


def test_from_env_reads_torchrun_variables(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in (("RANK", 5), ("WORLD_SIZE", 8), ("LOCAL_RANK", 1), ("LOCAL_WORLD_SIZE", 4)):
        clean_env.setenv(name, str(value))
    topology = topo.from_env()
    assert (topology.rank, topology.stage, topology.world_size, topology.local_rank) == (5, 5, 8, 1)
    assert (topology.prev_rank, topology.next_rank) == (4, 6)
    assert topology.is_distributed and topology.is_multinode
    assert not topology.is_first and not topology.is_last


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "3", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}, "RANK"),
        ({"RANK": "-1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK must be an integer"),
        # the GPU index comes from LOCAL_RANK only: RANK would be wrong on a second node
        ({"RANK": "5", "WORLD_SIZE": "8"}, "LOCAL_RANK is not set"),
        ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "4", "LOCAL_WORLD_SIZE": "4"},
         "LOCAL_RANK < LOCAL_WORLD_SIZE"),
    ],
)
def test_from_env_rejects_impossible_ranks(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(TopologyError, match=message):
        topo.from_env()


def test_roles_at_both_ends() -> None:
    first, last = Topology(0, 3, 0, CPU), Topology(2, 3, 0, CPU)
    assert first.is_first and not first.is_last and first.next_rank == 1
    assert last.is_last and not last.is_first and last.prev_rank == 1
    with pytest.raises(ValueError, match="first stage"):
        first.inbound_link()
    with pytest.raises(ValueError, match="last stage"):
        last.outbound_link()
    with pytest.raises(RuntimeError, match="init_distributed"):
        first.outbound_link()  # built by hand: no groups


def test_neighbours_get_different_gpus_and_shared_ones_go_through_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for count, gpus in ((4, [0, 1, 2, 3]), (2, [0, 1, 0, 1]), (1, [0, 0, 0, 0])):
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        assert [topo.device_for(r).index for r in range(4)] == gpus
    same = Placement(node=0, gpu=1, pid=10)
    assert same.shares_gpu_with(Placement(node=0, gpu=1, pid=11))
    assert not same.shares_gpu_with(Placement(node=1, gpu=1, pid=11))  # another node
    assert not Placement(0, -1, 1).shares_gpu_with(Placement(0, -1, 2))  # CPU stages


def test_single_process_needs_no_process_group(clean_env: pytest.MonkeyPatch) -> None:
    topology = topo.init_distributed()
    assert not dist.is_initialized() and topology.inbound is None and topology.outbound is None
    topo.shutdown()  # nothing to tear down: a no-op


def describe_links(topology: Topology) -> dict[str, object]:
    """Each rank reports its roles and proves each plane of its links carries data."""
    found: dict[str, object] = {
        "roles": (topology.stage, topology.is_first, topology.is_last),
        "neighbours": (topology.prev_rank, topology.next_rank),
        "backend": (topology.backend, str(topology.device)),
        "placements": [(p.node, p.gpu) for p in topology.placements],
        "links": [
            None if link is None else (
                link.peer,
                dist.get_process_group_ranks(link.control),
                dist.get_process_group_ranks(link.payload),
                link.via_host,
            )
            for link in (topology.inbound, topology.outbound)
        ],
    }
    if not topology.is_last:
        link = topology.outbound_link()
        dist.send(torch.tensor([topology.rank * 10]), dst=link.peer, group=link.control)
        payload = payload_buffer((2,), torch.float32, topology.device, link.via_host)
        dist.send(payload.fill_(topology.rank + 0.5), dst=link.peer, group=link.payload)
    if not topology.is_first:
        link = topology.inbound_link()
        got = torch.zeros(1, dtype=torch.int64)
        dist.recv(got, src=link.peer, group=link.control)
        payload = payload_buffer((2,), torch.float32, topology.device, link.via_host)
        dist.recv(payload, src=link.peer, group=link.payload)
        found["from_prev"] = (int(got.item()), payload.tolist())
    topo.shutdown()
    found["initialized_after_shutdown"] = dist.is_initialized()
    return found


def test_init_distributed_builds_two_planes_per_link() -> None:
    results = run_workers(describe_links, 3, deadline_s=60)
    assert [r.error for r in results] == ["", "", ""], [r.error for r in results]
    assert [r.exitcode for r in results] == [0, 0, 0]
    values = [r.value for r in results]
    assert [v["roles"] for v in values] == [(0, True, False), (1, False, False), (2, False, True)]
    assert [v["neighbours"] for v in values] == [(None, 1), (0, 2), (1, None)]
    assert all(v["backend"] == ("gloo", "cpu") for v in values)
    assert all(v["placements"] == [(0, -1)] * 3 for v in values)
    assert values[0]["links"] == [None, (1, [0, 1], [0, 1], False)]
    assert values[1]["links"] == [(0, [0, 1], [0, 1], False), (2, [1, 2], [1, 2], False)]
    assert values[2]["links"] == [(1, [1, 2], [1, 2], False), None]
    assert [v.get("from_prev") for v in values] == [None, (0, [0.5, 0.5]), (10, [1.5, 1.5])]
    assert not any(v["initialized_after_shutdown"] for v in values)


def misuse_the_planes(topology: Topology, how: str) -> str:
    """Each way a GPU run would fail on a group, tried on CPU in strict mode."""
    link = topology.outbound if topology.is_first else topology.inbound
    assert link is not None
    host_tensor = torch.ones(3)  # labels, a header: CPU data on a GPU machine
    device_tensor = payload_buffer((3,), torch.float32, topology.device, via_host=False)
    try:
        if how == "host tensor broadcast on a payload plane":
            dist.broadcast(host_tensor, src=0, group=link.payload)
        elif how == "device tensor on a control plane":
            dist.broadcast(device_tensor, src=0, group=link.control)
        elif how == "anything on the default group":
            dist.broadcast(host_tensor, src=0)
        elif how == "barrier on the default group":
            dist.barrier()
    except strict.DeviceRuleError as err:
        return str(err)
    return "accepted"


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("host tensor broadcast on a payload plane", "NCCL takes only tensors on the stage's GPU"),
        ("device tensor on a control plane", "carries CPU tensors only"),
        ("anything on the default group", "default process group"),
        ("barrier on the default group", "default process group"),
    ],
)
def test_strict_mode_refuses_what_nccl_would(how: str, message: str) -> None:
    results = run_workers(misuse_the_planes, 2, how, deadline_s=60)
    assert [r.error for r in results] == ["", ""], [r.error for r in results]
    for r in results:
        assert message in r.value, r.value


_REUSE = """
import ctypes, sys
from trgl_dist.runtime.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
first = libc.malloc(8 << 20)
libc.free(first)
second = libc.malloc(8 << 20)
print(kept, first == second)
"""


@pytest.mark.parametrize("keep", [True, False])
def test_malloc_keeps_freed_memory_on_glibc(keep: bool) -> None:
    # A fresh process each: malloc's thresholds depend on what the process allocated before.
    done = subprocess.run(
        [sys.executable, "-c", _REUSE, "keep" if keep else "default"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    kept, reused = done.stdout.split()
    # kept: the same 8 MiB block comes back; by default it was an mmap, returned on free
    assert (kept, reused) == (("True", "True") if keep else ("None", "False"))
