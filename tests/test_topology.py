"""Topology: torchrun environment, role properties, and the per-link groups on real ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_workers
from trgl_dist.runtime import topology as topo
from trgl_dist.runtime.topology import Topology

CPU = torch.device("cpu")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_from_env_defaults_to_one_process(clean_env: pytest.MonkeyPatch) -> None:
    topology = topo.from_env()
    assert (topology.rank, topology.world_size, topology.local_rank) == (0, 1, 0)
    assert topology.is_first and topology.is_last and not topology.is_distributed
    assert topology.prev_rank is None and topology.next_rank is None
    assert (topology.backend, topology.device) == ("gloo", CPU)  # no GPU on this machine


def test_from_env_reads_torchrun_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "1")
    topology = topo.from_env()
    assert (topology.rank, topology.stage, topology.world_size, topology.local_rank) == (5, 5, 8, 1)
    assert (topology.prev_rank, topology.next_rank) == (4, 6)
    assert topology.is_distributed and not topology.is_first and not topology.is_last


@pytest.mark.parametrize(("rank", "world_size"), [("3", "3"), ("-1", "2"), ("x", "2")])
def test_from_env_rejects_impossible_ranks(
    clean_env: pytest.MonkeyPatch, rank: str, world_size: str
) -> None:
    clean_env.setenv("RANK", rank)
    clean_env.setenv("WORLD_SIZE", world_size)
    with pytest.raises(ValueError, match="RANK"):
        topo.from_env()


def test_roles_at_both_ends() -> None:
    first, last = Topology(0, 3, 0, "gloo", CPU), Topology(2, 3, 0, "gloo", CPU)
    assert first.is_first and not first.is_last and first.next_rank == 1
    assert last.is_last and not last.is_first and last.prev_rank == 1
    with pytest.raises(ValueError, match="first stage"):
        first.inbound_group()
    with pytest.raises(ValueError, match="last stage"):
        last.outbound_group()
    with pytest.raises(RuntimeError, match="init_distributed"):
        first.outbound_group()  # built by hand: no groups


def test_single_process_needs_no_process_group(clean_env: pytest.MonkeyPatch) -> None:
    topology = topo.init_distributed()
    assert not dist.is_initialized() and topology.link_groups == ()
    topo.shutdown()  # nothing to tear down: a no-op


def describe_links(topology: Topology) -> dict[str, object]:
    """Each rank reports its roles and proves each of its links carries data both ways."""
    found: dict[str, object] = {
        "roles": (topology.stage, topology.is_first, topology.is_last),
        "neighbours": (topology.prev_rank, topology.next_rank),
        "backend": (topology.backend, str(topology.device)),
        "members": [
            None if g is None else dist.get_process_group_ranks(g) for g in topology.link_groups
        ],
    }
    if not topology.is_last:
        dist.send(
            torch.tensor([topology.rank * 10]),
            dst=topology.rank + 1,
            group=topology.outbound_group(),
        )
    if not topology.is_first:
        got = torch.zeros(1, dtype=torch.int64)
        dist.recv(got, src=topology.rank - 1, group=topology.inbound_group())
        found["from_prev"] = int(got.item())
    topo.shutdown()
    found["initialized_after_shutdown"] = dist.is_initialized()
    return found


def test_init_distributed_builds_one_group_per_link() -> None:
    results = run_workers(describe_links, 3, deadline_s=60)
    assert [r.error for r in results] == ["", "", ""], [r.error for r in results]
    assert [r.exitcode for r in results] == [0, 0, 0]
    values = [r.value for r in results]
    assert [v["roles"] for v in values] == [(0, True, False), (1, False, False), (2, False, True)]
    assert [v["neighbours"] for v in values] == [(None, 1), (0, 2), (1, None)]
    assert all(v["backend"] == ("gloo", "cpu") for v in values)
    # every rank built both links; the one it is not part of is None
    assert values[0]["members"] == [[0, 1], None]
    assert values[1]["members"] == [[0, 1], [1, 2]]
    assert values[2]["members"] == [None, [1, 2]]
    assert [v.get("from_prev") for v in values] == [None, 0, 10]
    assert not any(v["initialized_after_shutdown"] for v in values)
