"""The `pipeline` regime on one rank: build this stage, wire its links, run it, report."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from trgl_dist.checkpoints import files as ckpt
from trgl_dist.config import Config, write_toml
from trgl_dist.data import build_datasets
from trgl_dist.errors import CheckpointError, ConfigError, UserError, user_message
from trgl_dist.metrics.client import MetricsClient
from trgl_dist.metrics.collector import RunShape
from trgl_dist.metrics.coordinator import CoordinatorJob, CoordinatorProcess, start_coordinator
from trgl_dist.metrics.records import MAX_MESSAGE_CHARS, CheckpointRecord, ErrorRecord
from trgl_dist.network.models import InputSpec
from trgl_dist.rundir import CONFIG_FILE, run_directory
from trgl_dist.runtime import topology as topo
from trgl_dist.runtime.buffer import BatchBuffer
from trgl_dist.runtime.link import PeerFailure, Receiver, Sender
from trgl_dist.runtime.planes import LinkEnd, warm_links
from trgl_dist.runtime.streams import DeviceStreams
from trgl_dist.runtime.watchdog import Watchdog
from trgl_dist.runtime.wire import WireFormat
from trgl_dist.training.build import build_network, resolve_split
from trgl_dist.training.items import Batch
from trgl_dist.training.learner import ModuleLearner, build_learners
from trgl_dist.training.schedule import DataFeed, batch_stream, inbox_stream, stage_plan
from trgl_dist.training.snapshot import Resume, restore, run_meta, stage_state
from trgl_dist.training.stage import SaveStage, Send, StageWorker, stage_modules
from trgl_dist.training.timing import timer_for

log = logging.getLogger("trgl_dist")
COORDINATOR_WAIT_S = 60.0
RUN_INFO_BYTES = 4096
SECRET_ENV = "TRGL_RUN_SECRET"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class Interrupted(BaseException):
    """The launcher stopped this rank (SIGTERM: torchrun does so once any rank has failed).

    A BaseException, like KeyboardInterrupt: no ``except Exception`` on the way (reading a
    checkpoint, say) may take a signal for an error of its own."""


class StartFailed(UserError):
    """Another rank could not start (it printed why); this one stops with it."""


@dataclass
class Stage:
    """This rank's part of the run: its learners and what it needs around them."""

    config: Config  # as resolved (an equal-time split made explicit)
    learners: list[ModuleLearner]
    feed: DataFeed  # the batches; only stage 0 draws them
    counts: list[int]  # blocks per module, whole network
    meta: dict[str, object]  # what a checkpoint must agree on
    start_step: int = 0  # resumed: the checkpoint's step


def build_stage(config: Config, topology: topo.Topology) -> Stage:
    """Data (stage 0 first, so one process stages the files), all modules built from the seed,
    this stage's learners kept."""
    if not topology.is_first:
        dist.barrier(group=topology.control_world)
    torch.manual_seed(config.train.seed)
    train_set, test_set, spec = build_datasets(config.data, config.train.seed)
    if topology.is_first:
        dist.barrier(group=topology.control_world)
    config = _agree_on_split(config, spec, topology)
    modules, counts = build_network(config, spec)
    try:
        mine = stage_modules(len(modules), topology.world_size, topology.stage)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for k in mine:
        modules[k].to(topology.device)
    meta = run_meta(config, counts, spec, stages=topology.world_size)
    learners = build_learners(config, modules, mine)
    feed = DataFeed(config, train_set, test_set, topology.device)
    return Stage(config, learners, feed, counts, meta)


def _agree_on_split(config: Config, spec: InputSpec, topology: topo.Topology) -> Config:
    """Rank 0 measures an equal-time split on its device; every rank takes its counts."""
    if config.model.split != "equal-time" or config.model.split_counts:
        return config
    counts = torch.zeros(config.model.modules, dtype=torch.int64)
    if topology.is_first:
        resolved = resolve_split(config, spec, topology.device)
        counts[:] = torch.tensor(resolved.model.split_counts)
    dist.broadcast(counts, src=0, group=topology.control_world)
    return config.replace("model", split_counts=tuple(counts.tolist()))


def _start(config: Config, topology: topo.Topology, resume: Resume | None) -> Stage:
    """Build the stage (and restore it), then agree with every rank that all started.

    A rank that fails says why (a checkpoint error names its own file, on its own rank;
    an error every rank shares is said once, by the lowest rank that has it); the others
    stop with it instead of waiting for a peer that will never come.
    """
    error: UserError | None = None
    stage = None
    try:
        stage = build_stage(config, topology)
        if resume is not None:
            run_dir = Path(config.train.out)
            stage.start_step = restore(
                run_dir, stage.learners, stage.meta, topology.stage, resume.step
            )[0]
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
    assert stage is not None
    return stage


def _source(
    config: Config, topology: topo.Topology, stage: Stage, inbox: BatchBuffer | None,
    streams: DeviceStreams,
) -> Iterator[tuple[Batch, float]]:
    if topology.is_first:
        return batch_stream(config, stage.feed, stage.start_step)
    assert inbox is not None
    return ((streams.adopt(batch), waited) for batch, waited in inbox_stream(inbox))


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: teardown must not be interrupted
    raise Interrupted("stopped by SIGTERM")


@dataclass
class _Services:
    """What a rank must close on the way out."""

    coordinator: CoordinatorProcess | None = None
    client: MetricsClient | None = None
    watchdog: Watchdog | None = None


def run_pipeline(config: Config, resume: Resume | None = None) -> int:
    """One stage of the pipeline. Returns the process exit code (0, 1, 2 or 130)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    services = _Services()
    topology = None
    try:
        topology = topo.init_distributed(config.pipeline.link_timeout)
        logging.getLogger().handlers[0].setFormatter(
            logging.Formatter(f"%(asctime)s [stage {topology.stage}] %(message)s", "%H:%M:%S")
        )
        _train(config, topology, services, resume)
        code = 0
    except BaseException as err:  # noqa: BLE001 - every failure ends in one report and exit code
        code = _failed(err, topology, services.client)
    return _teardown(code, services)


def _train(
    config: Config, topology: topo.Topology, services: _Services, resume: Resume | None
) -> None:
    stage = _start(config, topology, resume)
    config = stage.config
    warm_links(topology)  # from this thread, before the link threads exist
    info: dict[str, str] = {}
    if topology.is_first:
        info = _start_coordinator(config, topology, stage, services, resume)
    info = _share_run_info(topology, info)
    services.client = MetricsClient(
        info["records"], rank=topology.rank, secret=bytes.fromhex(info["secret"])
    )
    services.watchdog = Watchdog(
        services.client, info["watch"], topology, coordinator=services.coordinator
    )
    services.watchdog.start()
    run_dir = Path(info["run_dir"])
    send = services.client.send

    def save(step: int, epoch: int) -> None:
        ckpt.save_stage(run_dir, step, topology.stage, stage_state(stage.learners, step, {}))
        send(CheckpointRecord(step=step, epoch=epoch, stage=topology.stage))

    run_stage(config, topology, stage, send, save)
    services.watchdog.stand_down()


def _share_run_info(topology: topo.Topology, info: dict[str, str]) -> dict[str, str]:
    """Rank 0's run directory, coordinator addresses and the run's secret (hex), broadcast
    to every rank as JSON bytes on the control plane."""
    payload = torch.zeros(RUN_INFO_BYTES, dtype=torch.uint8)
    if topology.is_first:
        raw = json.dumps(info).encode()
        payload[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    try:
        dist.broadcast(payload, src=0, group=topology.control_world)
    except RuntimeError as err:  # rank 0 failed before it could share them: it says why
        raise PeerFailure(0, str(err)) from None
    return dict(json.loads(bytes(payload[payload.nonzero().flatten()].tolist()).decode()))


def coordinator_bind(config: Config, topology: topo.Topology) -> tuple[str, str | None]:
    """(address the coordinator binds, host other nodes connect through).

    One node: loopback, unless told otherwise. Several nodes: a loopback address would
    leave the other nodes' ranks unheard, so it is an error; by default the coordinator
    binds torchrun's MASTER_ADDR (rank 0's host), or every interface if that address is
    not one of this host's.
    """
    chosen = config.pipeline.coordinator
    master = os.environ.get("MASTER_ADDR")
    if not topology.is_multinode:
        return chosen or "tcp://127.0.0.1:0", master
    if chosen:
        host = chosen.partition("://")[2].rpartition(":")[0]
        if host in _LOOPBACK_HOSTS or host.startswith("127."):
            raise ConfigError(
                f"pipeline.coordinator: {chosen} is a loopback address and the ranks run on "
                f"{topology.world_size // max(topology.local_world_size, 1)} nodes: ranks on "
                "other nodes could not reach it (give an address they reach, or leave it empty)"
            )
        return chosen, master
    if master and _is_local_address(master):
        return f"tcp://{master}:0", master
    return "tcp://0.0.0.0:0", master


def _is_local_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name: bind every interface rather than guess
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
        return True
    except OSError:
        return False


def run_secret() -> bytes:
    """The key that signs the run's records: fresh and random, unless TRGL_RUN_SECRET gives
    one (64 hex digits), for a tool of the user's that should report into the run."""
    chosen = os.environ.get(SECRET_ENV)
    if not chosen:
        return secrets.token_bytes(32)
    try:
        secret = bytes.fromhex(chosen)
    except ValueError:
        secret = b""
    if len(secret) != 32:
        raise ConfigError(f"{SECRET_ENV} must be 64 hexadecimal digits (32 bytes)")
    return secret


def _start_coordinator(
    config: Config,
    topology: topo.Topology,
    stage: Stage,
    services: _Services,
    resume: Resume | None,
) -> dict[str, str]:
    bind, connect_host = coordinator_bind(config, topology)
    run_dir = run_directory(config.train.out, config.train.regime, resume is not None)
    write_toml(config, run_dir / CONFIG_FILE)
    secret = run_secret()
    shape = RunShape(
        topology.world_size, config.model.modules, "pipeline", config.pipeline.link_timeout
    )
    job = CoordinatorJob(
        run_dir,
        shape,
        secret,
        bind=bind,
        append=resume is not None,
        extra={"blocks_per_module": stage.counts},
        checkpoints={"meta": stage.meta, "keep": config.train.keep_checkpoints},
    )
    services.coordinator, addresses = start_coordinator(job, connect_host=connect_host)
    log.info(
        "%d stages, modules of %s blocks, run directory %s",
        topology.world_size,
        stage.counts,
        run_dir,
    )
    return {
        "records": addresses.records,
        "watch": addresses.watch,
        "run_dir": str(run_dir),
        "secret": secret.hex(),
    }


def _failed(
    err: BaseException, topology: topo.Topology | None, client: MetricsClient | None
) -> int:
    """Report a failure to the coordinator; only a rank's own error is printed here (the
    coordinator names the root cause once for the whole run)."""
    rank = topology.rank if topology is not None else int(os.environ.get("RANK", "0"))
    if isinstance(err, StartFailed):
        return 2
    if isinstance(err, UserError):
        if client is None:  # before the coordinator: this rank says it
            print(f"error: {user_message(err)}", file=sys.stderr)
        else:  # during the run: the coordinator names it, once
            _report(client, topology, "exception", f"{type(err).__name__}: {user_message(err)}",
                    None)
        return 2
    if isinstance(err, PeerFailure):
        log.debug("stopping: %s", err)
        _report(client, topology, "peer-lost", str(err), err.peer)
        return 1
    if isinstance(err, Interrupted | KeyboardInterrupt):
        if client is None and rank == 0:
            print("trgl_dist: interrupted while starting", file=sys.stderr)
        _report(client, topology, "interrupted", str(err) or "interrupted", None)
        return 130
    message = f"{type(err).__name__}: {err}"
    if client is None:  # no coordinator to tell yet: say it here
        print(f"error: stage {rank} (rank {rank}): {message}", file=sys.stderr)
    log.debug("traceback", exc_info=err)
    _report(client, topology, "exception", message, None)
    return 1


def _teardown(code: int, services: _Services) -> int:
    # The launcher's SIGTERM (sent once any rank failed) must not cut the wait for the
    # coordinator, which is gathering the reports that name the failure.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if services.watchdog is not None:
            services.watchdog.stand_down()
        if services.client is not None:
            services.client.close()
        if services.coordinator is not None:
            services.coordinator.join(COORDINATOR_WAIT_S)
            if services.coordinator.exitcode != 0:
                code = code or 1
    except BaseException as err:  # noqa: BLE001 - e.g. a loader worker killed by the launcher
        log.debug("teardown: %s", err)
        code = code or 1
    if code != 0:
        # Link threads may sit in a blocking send/recv that only the peer's exit releases:
        # leave at once rather than tear the process group down politely.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    topo.shutdown()
    return code


def run_stage(
    config: Config, topology: topo.Topology, stage: Stage, send: Send, save: SaveStage | None = None
) -> StageWorker:
    """Train this stage until END; records go to ``send``, checkpoints to ``save``.
    Returns the finished worker (its clock and buffers hold the stage's statistics)."""
    worker, threads = _wire_stage(config, topology, stage, send, save)
    worker.run()
    for thread in threads:
        # The sender returns once END is on the wire, the receiver once END arrived: a
        # process group torn down before that would leave the next stage waiting. No
        # bound here: a peer that never answers is the watchdog's to end.
        thread.join()
    return worker


class _Handoff:
    """The outbox as the compute thread sees it: each batch handed off with its CUDA event."""

    def __init__(self, outbox: BatchBuffer, streams: DeviceStreams) -> None:
        self.outbox, self.streams = outbox, streams

    @property
    def depth(self) -> int:
        return self.outbox.depth

    def put(self, batch: Batch) -> float:
        return self.outbox.put(self.streams.handoff(batch))

    def stats(self) -> dict[str, Any]:
        return self.outbox.stats()


def _wire_stage(
    config: Config, topology: topo.Topology, stage: Stage, send: Send, save: SaveStage | None
) -> tuple[StageWorker, list[Receiver | Sender]]:
    """The stage with its inbox (fed by a receiver thread) and outbox (drained by a sender)."""
    p = config.pipeline
    streams = DeviceStreams(topology.device)
    wire = WireFormat(max_labels=2 * config.data.batch_size)  # a test batch is twice as big
    inbox = outbox = None
    threads: list[Receiver | Sender] = []
    if not topology.is_first:
        inbox = BatchBuffer(p.buffer_size, p.buffer_policy, p.max_reuse)
        end = LinkEnd(topology.inbound_link(), wire, topology.device, streams)
        threads.append(Receiver(end, inbox))
    if not topology.is_last:
        outbox = BatchBuffer(p.buffer_size, "fifo")
        end = LinkEnd(topology.outbound_link(), wire, topology.device, streams)
        threads.append(Sender(end, outbox))
    for thread in threads:
        thread.start()
    worker = StageWorker(
        topology.stage,
        stage.learners,
        _source(config, topology, stage, inbox, streams),
        _Handoff(outbox, streams) if outbox is not None else None,
        send,
        stage_plan(config, stage.feed, stage.start_step),
        device=topology.device,
        rank=topology.rank,
        timer=timer_for(topology.device),
        inbox=inbox,
        links=threads,
        save=save,
    )
    return worker, threads


def _report(
    client: MetricsClient | None,
    topology: topo.Topology | None,
    cause: str,
    message: str,
    peer: int | None,
) -> None:
    if client is None or topology is None:
        return
    client.send(
        ErrorRecord(
            step=-1,
            epoch=-1,
            stage=topology.stage,
            rank=topology.rank,
            message=message[:MAX_MESSAGE_CHARS],
            cause=cause,
            peer=peer,
        )
    )

