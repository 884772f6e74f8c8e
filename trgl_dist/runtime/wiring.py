"""One rank's stage, built and wired: its modules, its links to the replicas around it, its
replicas' gradient averaging, and the stage loop that runs until END."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from trgl_dist.config import Config
from trgl_dist.data import build_datasets
from trgl_dist.errors import ConfigError, first_line
from trgl_dist.metrics.spans import NullRecorder, Recorder
from trgl_dist.network.models import InputSpec
from trgl_dist.runtime import strict
from trgl_dist.runtime import topology as topo
from trgl_dist.runtime.buffer import BatchBuffer
from trgl_dist.runtime.link import PeerFailure, Receiver, Sender
from trgl_dist.runtime.planes import LinkEnd
from trgl_dist.runtime.routing import Fanout, merged_inboxes
from trgl_dist.runtime.streams import DeviceStreams
from trgl_dist.runtime.wire import WireFormat
from trgl_dist.scheduling import yield_to_compute
from trgl_dist.training.build import build_network, resolve_split
from trgl_dist.training.items import Batch, Kind
from trgl_dist.training.learner import ModuleLearner, build_learners
from trgl_dist.training.schedule import DataFeed, batch_stream, inbox_stream, skeleton, stage_plan
from trgl_dist.training.snapshot import run_meta
from trgl_dist.training.stage import SaveStage, Send, StageWorker
from trgl_dist.training.stageplan import stage_modules
from trgl_dist.training.timing import timer_for

#: Seconds the sender threads of a failing stage get to put its ERROR batch on the wire.
ERROR_SEND_S = 5.0


@dataclass
class Stage:
    """This rank's part of the run: its learners and what it needs around them."""

    config: Config  # as resolved (an equal-time split made explicit)
    learners: list[ModuleLearner]
    feed: DataFeed  # the batches; only stage 0 draws them
    counts: list[int]  # blocks per module, whole network
    meta: dict[str, object]  # what a checkpoint must agree on
    start_step: int = 0  # resumed: the checkpoint's step


def modules_of(config: Config, topology: topo.Topology) -> range:
    """The contiguous modules of this rank's stage: --stage-modules, or as even as possible."""
    counts = config.pipeline.stage_modules
    if not counts:
        try:
            return stage_modules(config.model.modules, topology.num_stages, topology.stage)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if len(counts) != topology.num_stages:
        raise ConfigError(
            f"pipeline.stage_modules has {len(counts)} counts for {topology.num_stages} stages"
        )
    start = sum(counts[: topology.stage])
    return range(start, start + counts[topology.stage])


def build_stage(config: Config, topology: topo.Topology) -> Stage:
    """Data (rank 0 first, so one process stages the files), all modules built from the seed,
    this stage's learners kept; replicas average their gradients over the replica group."""
    if not topology.is_rank_zero:
        dist.barrier(group=topology.control_world)
    torch.manual_seed(config.train.seed)
    train_set, test_set, spec = build_datasets(config.data, config.train.seed)
    if topology.is_rank_zero:
        dist.barrier(group=topology.control_world)
    config = _agree_on_split(config, spec, topology)
    modules, counts = build_network(config, spec)
    mine = modules_of(config, topology)
    for k in mine:
        modules[k].to(topology.device)
    learners = build_learners(config, modules, mine)
    if topology.replica_group is not None:
        average = _replica_average(topology, topology.replica_group)
        for learner in learners:
            learner.grad_scale, learner.reduce = 1.0 / topology.replicas, average
    feed = DataFeed(config, train_set, test_set, topology.device)
    return Stage(config, learners, feed, counts, run_meta(config, counts, spec))


def _replica_average(
    topology: topo.Topology, group: dist.ProcessGroup
) -> Callable[[ModuleLearner], None]:
    """Sum a module's gradients across the stage's replicas (each batch's were scaled by
    1 / replicas), in one flat all-reduce; through host memory when replicas share a GPU.
    A replica gone mid-reduce is a PeerFailure naming it (when there is one other)."""
    plan, stage = topology.plan, topology.stage
    others = [plan.rank_of(stage, i) for i in range(topology.replicas) if i != topology.replica]
    peer = others[0] if len(others) == 1 else None
    name = plan.describe(peer) if peer is not None else f"a replica of stage {stage}"

    def all_reduce(flat: torch.Tensor) -> None:
        try:
            dist.all_reduce(flat, group=group)
        except RuntimeError as err:  # Gloo and NCCL raise subclasses of it
            raise PeerFailure(peer, f"gradient all-reduce: {first_line(err)}", name) from None

    def reduce(learner: ModuleLearner) -> None:
        params = [p for p in learner.module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        if topology.replica_via_host:
            host = flat.cpu()
            all_reduce(host)
            flat = host.to(flat.device)
        else:
            flat = strict.device_tensor(flat)
            all_reduce(flat)
        for p, summed in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
            p.grad = summed

    return reduce


def _agree_on_split(config: Config, spec: InputSpec, topology: topo.Topology) -> Config:
    """Rank 0 measures an equal-time split on its device; every rank takes its counts."""
    if config.model.split != "equal-time" or config.model.split_counts:
        return config
    counts = torch.zeros(config.model.modules, dtype=torch.int64)
    if topology.is_rank_zero:
        resolved = resolve_split(config, spec, topology.device)
        counts[:] = torch.tensor(resolved.model.split_counts)
    dist.broadcast(counts, src=0, group=topology.control_world)
    return config.replace("model", split_counts=tuple(counts.tolist()))


def run_stage(
    config: Config,
    topology: topo.Topology,
    stage: Stage,
    send: Send,
    save: SaveStage | None = None,
    spans: Recorder | None = None,
) -> StageWorker:
    """Train this stage until END; records go to ``send``, checkpoints to ``save``, timeline
    spans to ``spans``. Returns the finished worker (its clock and buffers hold the stage's
    statistics)."""
    spans = spans or NullRecorder()
    for learner in stage.learners:
        learner.spans = spans
    worker, threads = _wire_stage(config, topology, stage, send, save, spans)
    try:
        worker.run()
    except BaseException as err:
        _tell_downstream(worker, threads, err)
        raise
    for thread in threads:
        # The sender returns once END is on the wire, the receiver once END arrived: a
        # process group torn down before that would leave the next stage waiting. No
        # bound here: a peer that never answers is the watchdog's to end.
        thread.join()
    return worker


def _tell_downstream(
    worker: StageWorker, threads: list[Receiver | Sender], err: BaseException
) -> None:
    """A failing stage's ERROR batch to the next stage, so that it stops at once and names
    this one (the coordinator also tells every rank; this does not wait for it). The
    senders get a few seconds to put it on the wire."""
    if not isinstance(worker.outbox, Fanout):
        return
    cause = f"{type(err).__name__}: {first_line(err)}"
    error = Batch(Kind.ERROR, worker.step, worker.last_epoch, None, None, None, cause)
    worker.outbox.last_word(error)
    deadline = time.monotonic() + ERROR_SEND_S
    for thread in threads:
        if isinstance(thread, Sender):
            thread.join_until(max(0.0, deadline - time.monotonic()))


def _wire_stage(
    config: Config,
    topology: topo.Topology,
    stage: Stage,
    send: Send,
    save: SaveStage | None,
    spans: Recorder,
) -> tuple[StageWorker, list[Receiver | Sender]]:
    """The stage with an inbox per inbound link (each fed by a receiver thread) and an
    outbox per outbound link (each drained by a sender thread)."""
    p = config.pipeline
    streams = DeviceStreams(topology.device)
    wire = WireFormat(max_labels=2 * config.data.batch_size)  # a test batch is twice as big
    inboxes = {
        link.peer: BatchBuffer(p.buffer_size, p.buffer_policy, p.max_reuse)
        for link in topology.inbound_links
    }
    outboxes = {link.peer: BatchBuffer(p.buffer_size, "fifo") for link in topology.outbound_links}
    threads: list[Receiver | Sender] = [
        Receiver(LinkEnd(link, wire, topology.device, streams), inboxes[link.peer], spans)
        for link in topology.inbound_links
    ]
    threads += [
        Sender(LinkEnd(link, wire, topology.device, streams), outboxes[link.peer], spans)
        for link in topology.outbound_links
    ]
    for thread in threads:
        thread.start()
    yield_to_compute()  # link, Gloo, watchdog and zmq threads: no preempting the compute
    plan = dataclasses.replace(
        stage_plan(config, stage.feed, stage.start_step),
        replica=topology.replica,
        replicas=topology.replicas,
        period=topology.plan.period,
        probe_memory=True,
    )
    fanout = None
    if outboxes:
        fanout = Fanout(outboxes, streams, topology.plan, topology.stage + 1)
    worker = StageWorker(
        topology.stage,
        stage.learners,
        _source(config, topology, stage, inboxes, streams),
        fanout,
        send,
        plan,
        device=topology.device,
        rank=topology.rank,
        timer=timer_for(topology.device),
        inbox=next(iter(inboxes.values())) if len(inboxes) == 1 else None,
        links=threads,
        save=save,
        spans=spans,
    )
    return worker, threads


def _source(
    config: Config,
    topology: topo.Topology,
    stage: Stage,
    inboxes: dict[int, BatchBuffer],
    streams: DeviceStreams,
) -> Iterator[tuple[Batch, float]]:
    """Stage 0: its share of the schedule, with the data. Later stages: their inbox; or, when
    replicas are involved, their inboxes merged in the schedule's order."""
    feed, start = stage.feed, stage.start_step
    if topology.is_first:
        return batch_stream(config, feed, start, topology.replica, topology.replicas)
    if max(topology.plan.replicas) == 1:
        (inbox,) = inboxes.values()
        return ((streams.adopt(batch), waited) for batch, waited in inbox_stream(inbox))
    slots = skeleton(config, feed.steps_per_epoch, feed.test_batch_count, start)
    return merged_inboxes(slots, inboxes, streams, topology.plan, topology.stage, topology.replica)
