"""The `pipeline` regime on one rank: build this stage, wire its links, run it, report."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from trgl_dist.checkpoints import files as ckpt
from trgl_dist.config import Config, write_toml
from trgl_dist.data import IndexedImages, build_datasets
from trgl_dist.errors import ConfigError, UserError
from trgl_dist.metrics.client import MetricsClient
from trgl_dist.metrics.collector import RunShape
from trgl_dist.metrics.coordinator import CoordinatorJob, start_coordinator
from trgl_dist.metrics.records import MAX_MESSAGE_CHARS, CheckpointRecord, ErrorRecord
from trgl_dist.network.models import InputSpec
from trgl_dist.rundir import CONFIG_FILE, run_directory
from trgl_dist.runtime import topology as topo
from trgl_dist.runtime.buffer import BatchBuffer
from trgl_dist.runtime.link import PeerFailure, Receiver, Sender
from trgl_dist.training.build import build_network, resolve_split
from trgl_dist.training.items import Batch
from trgl_dist.training.learner import ModuleLearner, build_learners
from trgl_dist.training.schedule import batch_stream, inbox_stream, stage_plan
from trgl_dist.training.snapshot import restore, run_meta, stage_state
from trgl_dist.training.stage import SaveStage, Send, StageWorker, stage_modules

log = logging.getLogger("trgl_dist")
COORDINATOR_WAIT_S = 60.0
RUN_INFO_BYTES = 4096


def _share_run_info(topology: topo.Topology, info: dict[str, str]) -> dict[str, str]:
    """Rank 0's run directory, coordinator address and the run's secret (hex), broadcast to
    every rank as JSON bytes."""
    payload = torch.zeros(RUN_INFO_BYTES, dtype=torch.uint8)
    if topology.is_first:
        raw = json.dumps(info).encode()
        payload[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    try:
        dist.broadcast(payload, src=0)
    except RuntimeError as err:  # rank 0 failed before it could share them: it says why
        raise PeerFailure(0, str(err)) from None
    return json.loads(bytes(payload[payload.nonzero().flatten()].tolist()).decode())


@dataclass
class Stage:
    """This rank's part of the run: its learners and what it needs around them."""

    config: Config  # as resolved (an equal-time split made explicit)
    learners: list[ModuleLearner]
    train_set: IndexedImages
    test_set: IndexedImages
    counts: list[int]  # blocks per module, whole network
    meta: dict[str, Any]  # what a checkpoint must agree on
    start_step: int = 0  # resumed: the checkpoint's step


def build_stage(config: Config, topology: topo.Topology) -> Stage:
    """Data (stage 0 first, so one process stages the files), all modules built from the seed,
    this stage's learners kept."""
    if not topology.is_first:
        dist.barrier()
    torch.manual_seed(config.train.seed)
    train_set, test_set, spec = build_datasets(config.data, config.train.seed)
    if topology.is_first:
        dist.barrier()
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
    return Stage(config, learners, train_set, test_set, counts, meta)


def _agree_on_split(config: Config, spec: InputSpec, topology: topo.Topology) -> Config:
    """Rank 0 measures an equal-time split; every rank takes its counts."""
    if config.model.split != "equal-time" or config.model.split_counts:
        return config
    counts = torch.zeros(config.model.modules, dtype=torch.int64)
    if topology.is_first:
        counts[:] = torch.tensor(resolve_split(config, spec).model.split_counts)
    dist.broadcast(counts, src=0)
    return config.replace("model", split_counts=tuple(counts.tolist()))


def _source(
    config: Config, topology: topo.Topology, stage: Stage, inbox: BatchBuffer | None
) -> Iterator[tuple[Batch, float]]:
    if topology.is_first:
        return batch_stream(config, stage.train_set, stage.test_set, stage.start_step)
    assert inbox is not None
    return inbox_stream(inbox)


class Interrupted(Exception):
    """The launcher stopped this rank (SIGTERM: torchrun does so once any rank has failed)."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: teardown must not be interrupted
    raise Interrupted("stopped by SIGTERM")


@dataclass
class _Services:
    """What a rank must close on the way out."""

    coordinator: BaseProcess | None = None
    client: MetricsClient | None = None


def run_pipeline(config: Config, resume: bool = False) -> int:
    """One stage of the pipeline. Returns the process exit code (0, 1, 2 or 130)."""
    topology = topo.init_distributed()
    logging.getLogger().handlers[0].setFormatter(
        logging.Formatter(f"%(asctime)s [stage {topology.stage}] %(message)s", "%H:%M:%S")
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    services = _Services()
    try:
        _train(config, topology, services, resume)
        code = 0
    except BaseException as err:  # noqa: BLE001 - every failure ends in one report and exit code
        code = _failed(err, topology, services.client)
    return _teardown(code, services)


def _train(config: Config, topology: topo.Topology, services: _Services, resume: bool) -> None:
    stage = build_stage(config, topology)
    config = stage.config
    if resume:
        run_dir = Path(config.train.out)
        stage.start_step = restore(run_dir, stage.learners, stage.meta, topology.stage)[0]
    info: dict[str, str] = {}
    if topology.is_first:
        info = _start_coordinator(config, topology, stage, services, resume)
    info = _share_run_info(topology, info)
    services.client = MetricsClient(
        info["address"], rank=topology.rank, secret=bytes.fromhex(info["secret"])
    )
    run_dir = Path(info["run_dir"])
    send = services.client.send

    def save(step: int, epoch: int) -> None:
        ckpt.save_stage(run_dir, step, topology.stage, stage_state(stage.learners, step, {}))
        send(CheckpointRecord(step=step, epoch=epoch, stage=topology.stage))

    run_stage(config, topology, stage, send, save)


def _start_coordinator(
    config: Config, topology: topo.Topology, stage: Stage, services: _Services, resume: bool
) -> dict[str, str]:
    run_dir = run_directory(config.train.out, config.train.regime, resume)
    write_toml(config, run_dir / CONFIG_FILE)
    secret = secrets.token_bytes(32)
    job = CoordinatorJob(
        run_dir,
        RunShape(topology.world_size, config.model.modules, "pipeline"),
        secret,
        bind=config.pipeline.coordinator,
        append=resume,
        extra={"blocks_per_module": stage.counts},
        checkpoints={"meta": stage.meta, "keep": config.train.keep_checkpoints},
    )
    # other nodes reach a wildcard-bound coordinator at torchrun's rendezvous host
    services.coordinator, address = start_coordinator(
        job, connect_host=os.environ.get("MASTER_ADDR")
    )
    log.info(
        "%d stages, modules of %s blocks, run directory %s",
        topology.world_size,
        stage.counts,
        run_dir,
    )
    return {"address": address, "run_dir": str(run_dir), "secret": secret.hex()}


def _failed(err: BaseException, topology: topo.Topology, client: MetricsClient | None) -> int:
    """Report a failure to the coordinator; only a rank's own error is printed here (the
    coordinator names the root cause once for the whole run)."""
    where = f"stage {topology.stage} (rank {topology.rank})"
    if isinstance(err, UserError):
        if topology.is_first:  # every rank has the same config: say it once
            print(f"error: {err}", file=sys.stderr)
        return 2
    if isinstance(err, PeerFailure):
        log.debug("stopping: %s", err)
        _report(client, topology, "peer-lost", str(err), err.peer)
        return 1
    if isinstance(err, Interrupted | KeyboardInterrupt):
        _report(client, topology, "interrupted", str(err) or "interrupted", None)
        return 130
    message = f"{type(err).__name__}: {err}"
    if client is None:  # no coordinator to tell yet: say it here
        print(f"error: {where}: {message}", file=sys.stderr)
    log.debug("traceback", exc_info=err)
    _report(client, topology, "exception", message, None)
    return 1


def _teardown(code: int, services: _Services) -> int:
    # The launcher's SIGTERM (sent once any rank failed) must not cut the wait for the
    # coordinator, which is gathering the reports that name the failure.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if services.client is not None:
        services.client.close()
    if services.coordinator is not None:
        services.coordinator.join(COORDINATOR_WAIT_S)
        if services.coordinator.exitcode != 0:
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
    for thread in threads:  # the sender finishes once END is on the wire
        thread.join()
    return worker


def _wire_stage(
    config: Config, topology: topo.Topology, stage: Stage, send: Send, save: SaveStage | None
) -> tuple[StageWorker, list[threading.Thread]]:
    """The stage with its inbox (fed by a receiver thread) and outbox (drained by a sender)."""
    p = config.pipeline
    inbox = outbox = None
    threads: list[threading.Thread] = []
    if not topology.is_first:
        assert topology.prev_rank is not None
        inbox = BatchBuffer(p.buffer_size, p.buffer_policy, p.max_reuse)
        threads.append(
            Receiver(topology.prev_rank, topology.inbound_group(), topology.device, inbox)
        )
    if not topology.is_last:
        assert topology.next_rank is not None
        outbox = BatchBuffer(p.buffer_size, "fifo")
        threads.append(
            Sender(topology.next_rank, topology.outbound_group(), topology.device, outbox)
        )
    for thread in threads:
        thread.start()
    worker = StageWorker(
        topology.stage,
        stage.learners,
        _source(config, topology, stage, inbox),
        outbox,
        send,
        stage_plan(config, stage.train_set, stage.start_step),
        device=topology.device,
        rank=topology.rank,
        inbox=inbox,
        links=threads,
        save=save,
    )
    return worker, threads


def _report(
    client: MetricsClient | None,
    topology: topo.Topology,
    cause: str,
    message: str,
    peer: int | None,
) -> None:
    if client is None:
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
