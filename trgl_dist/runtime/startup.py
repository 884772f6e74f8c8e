"""What every rank does together before training: profile the blocks side by side, agree
on rank 0's plan of the layout, and start or stop as one (a rank that cannot start says
why once; the others stop with it instead of waiting for a peer that never comes)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from trgl_dist.config import Config
from trgl_dist.data import input_spec
from trgl_dist.errors import CheckpointError, UserError, user_message
from trgl_dist.layout import Layout
from trgl_dist.planning.plan import machine_for, make_plan, measured_modules, table
from trgl_dist.planning.profile import Measure, measure_on_ranks, side_by_side, usable_cores
from trgl_dist.runtime import topology as topo
from trgl_dist.runtime.link import PeerFailure

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Bytes of a JSON message broadcast from rank 0 (the plan, the run's addresses).
JSON_BYTES = 65536


class StartFailed(UserError):
    """Another rank could not start (it printed why); this one stops with it."""


def together(topology: topo.Topology, work: Callable[[], T]) -> T:
    """``work()`` on every rank; if it raises a UserError on any, every rank stops. A
    checkpoint error is said by each rank that has it (each names its own file); any
    other, said once, by the lowest rank that has it."""
    error: UserError | None = None
    result: T | None = None
    try:
        result = work()
    except UserError as err:
        error = err
    failed = torch.tensor([topology.rank if error is not None else topology.world_size])
    dist.all_reduce(failed, op=dist.ReduceOp.MIN, group=topology.control_world)
    first = int(failed.item())
    if error is not None:
        speaks = isinstance(error, CheckpointError) or topology.rank == first
        raise error if speaks else StartFailed(str(error))
    if first < topology.world_size:
        raise StartFailed(f"rank {first} could not start")
    return result  # type: ignore[return-value]  # set: no rank failed


def broadcast_json(topology: topo.Topology, message: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's ``message`` on every rank, as JSON bytes on the control plane."""
    payload = torch.zeros(JSON_BYTES, dtype=torch.uint8)
    if topology.is_rank_zero:
        raw = json.dumps(message).encode()
        if len(raw) > JSON_BYTES:
            raise RuntimeError(f"a start-up message of {len(raw)} bytes (at most {JSON_BYTES})")
        payload[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    try:
        dist.broadcast(payload, src=0, group=topology.control_world)
    except RuntimeError as err:  # rank 0 failed before it could send: it says why
        raise PeerFailure(0, str(err)) from None
    return dict(json.loads(bytes(payload[payload.nonzero().flatten()].tolist()).decode()))


def agree_on_plan(config: Config, topology: topo.Topology) -> tuple[Config, Layout, dict[str, Any]]:
    """The layout of the ranks and the config they run with (split, modules per stage and
    replicas explicit), from block times the ranks measured side by side; and rank 0's
    prediction per stage, which the run's report compares with what it measured."""
    spec = together(topology, lambda: input_spec(config.data))
    profilers = side_by_side(topology.local_world_size, topology.device)
    if topology.is_rank_zero:
        log.info("profiling %s on %s, %d rank(s) at once", config.model.name, topology.device,
                 profilers)

    def on_ranks(measure: Measure) -> list[float]:
        return together(topology, lambda: measure_on_ranks(
            measure, topology.control_world, topology.local_rank, profilers
        ))  # fmt: skip

    counts, seconds = together(
        topology, lambda: measured_modules(config, spec, topology.device, on_ranks)
    )
    message: dict[str, Any] = {}
    failure: UserError | None = None
    if topology.is_rank_zero:
        nodes = max(1, topology.world_size // max(topology.local_world_size, 1))
        machine = machine_for(topology.device, usable_cores() * nodes)
        try:
            plan = make_plan(config, spec, topology.world_size, counts, seconds, machine)
            message = {"plan": plan.as_dict()}
            log.info("plan (%s):\n%s", config.pipeline.plan, table(plan))
        except UserError as err:
            failure, message = err, {"error": user_message(err)}
    message = broadcast_json(topology, message)
    if failure is not None:
        raise failure
    if "error" in message:
        raise StartFailed(message["error"])
    chosen = message["plan"]
    replicas = tuple(s["replicas"] for s in chosen["stages"])
    config = config.replace("model", split_counts=tuple(chosen["blocks_per_module"]))
    config = config.replace(
        "pipeline",
        stage_modules=tuple(len(s["modules"]) for s in chosen["stages"]),
        stage_replicas=replicas,
    )
    return config, Layout(replicas), chosen
