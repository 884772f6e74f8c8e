"""The `pipeline` regime on one rank: build this stage, wire its links, run it, report."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from trgl_dist import topology as topo
from trgl_dist.buffer import BatchBuffer
from trgl_dist.config import Config, ConfigError, write_toml
from trgl_dist.coordinator import start_coordinator
from trgl_dist.data import DataError, build_datasets
from trgl_dist.feed import batch_stream, inbox_stream
from trgl_dist.learner import ModuleLearner, taus
from trgl_dist.link import PeerFailure, Receiver, Sender
from trgl_dist.metrics_client import MetricsClient
from trgl_dist.network import build_network
from trgl_dist.stage import Send, StageWorker, stage_modules
from trgl_dist.wire import Batch

log = logging.getLogger("trgl_dist")
COORDINATOR_WAIT_S = 60.0
RUN_INFO_BYTES = 4096


def _share_run_info(topology: topo.Topology, info: dict[str, str]) -> dict[str, str]:
    """Rank 0's run directory and coordinator address, broadcast to every rank as JSON bytes."""
    payload = torch.zeros(RUN_INFO_BYTES, dtype=torch.uint8)
    if topology.is_first:
        raw = json.dumps(info).encode()
        payload[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    dist.broadcast(payload, src=0)
    return json.loads(bytes(payload[payload.nonzero().flatten()].tolist()).decode())


def build_stage(config: Config, topology: topo.Topology) -> tuple[list[ModuleLearner], Any]:
    """Data (stage 0 first, so one process stages the files), all modules built from the seed,
    this stage's learners kept."""
    if not topology.is_first:
        dist.barrier()
    torch.manual_seed(config.train.seed)
    train_set, test_set, spec = build_datasets(config.data, config.train.seed)
    if topology.is_first:
        dist.barrier()
    modules, counts = build_network(config, spec)
    try:
        mine = stage_modules(len(modules), topology.world_size, topology.stage)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tau = taus(config, len(modules))
    learners = [
        ModuleLearner(k, modules[k].to(topology.device), config, tau[k], config.train.epochs)
        for k in mine
    ]
    return learners, (train_set, test_set, counts)


def _source(
    config: Config, topology: topo.Topology, data: Any, inbox: BatchBuffer | None
) -> Iterator[tuple[Batch, float]]:
    if topology.is_first:
        torch.manual_seed(config.train.seed + 1)
        return batch_stream(config, data[0], data[1])
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


def run_pipeline(config: Config) -> int:
    """One stage of the pipeline. Returns the process exit code (0, 1, 2 or 130)."""
    topology = topo.init_distributed()
    logging.getLogger().handlers[0].setFormatter(
        logging.Formatter(f"%(asctime)s [stage {topology.stage}] %(message)s", "%H:%M:%S")
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    services = _Services()
    try:
        _train(config, topology, services)
        code = 0
    except BaseException as err:  # noqa: BLE001 - every failure ends in one report and exit code
        code = _failed(err, topology, services.client)
    return _teardown(code, services)


def _train(config: Config, topology: topo.Topology, services: _Services) -> None:
    learners, data = build_stage(config, topology)
    info: dict[str, str] = {}
    if topology.is_first:
        from trgl_dist.train import run_directory

        run_dir = run_directory(config)
        write_toml(config, run_dir / "config.toml")
        services.coordinator, address = start_coordinator(
            run_dir,
            world_size=topology.world_size,
            num_modules=config.model.modules,
            regime="pipeline",
            bind=config.pipeline.coordinator,
            extra={"blocks_per_module": data[2]},
        )
        info = {"address": address, "run_dir": str(run_dir)}
        log.info(
            "%d stages, modules of %s blocks, run directory %s",
            topology.world_size,
            data[2],
            run_dir,
        )
    info = _share_run_info(topology, info)
    services.client = MetricsClient(info["address"])
    run_stage(config, topology, learners, data, services.client.send)


def _failed(err: BaseException, topology: topo.Topology, client: MetricsClient | None) -> int:
    """Report a failure to the coordinator; only a rank's own error is printed here (the
    coordinator names the root cause once for the whole run)."""
    where = f"stage {topology.stage} (rank {topology.rank})"
    if isinstance(err, ConfigError | DataError):
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
    config: Config, topology: topo.Topology, learners: list[ModuleLearner], data: Any, send: Send
) -> None:
    """Train this stage until END; records go to ``send``."""
    worker, threads = _wire_stage(config, topology, learners, data, send)
    worker.run()
    for thread in threads:  # the sender finishes once END is on the wire
        thread.join()


def _wire_stage(
    config: Config, topology: topo.Topology, learners: list[ModuleLearner], data: Any, send: Send
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
        learners,
        _source(config, topology, data, inbox),
        outbox,
        send,
        log_every=config.train.log_every,
        device=topology.device,
        inbox=inbox,
        links=threads,
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
        {
            "kind": "error",
            "step": -1,
            "epoch": -1,
            "stage": topology.stage,
            "rank": topology.rank,
            "message": message,
            "cause": cause,
            "peer": peer,
        }
    )
