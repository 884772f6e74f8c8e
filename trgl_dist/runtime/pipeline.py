"""The `pipeline` regime on one rank: build this stage, wire its links, run it, report."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from trgl_dist.config import Config, write_toml
from trgl_dist.errors import CheckpointError, ConfigError, UserError, user_message
from trgl_dist.layout import Layout
from trgl_dist.metrics.client import MetricsClient
from trgl_dist.metrics.collector import RunShape
from trgl_dist.metrics.coordinator import CoordinatorJob, CoordinatorProcess, start_coordinator
from trgl_dist.metrics.records import MAX_MESSAGE_CHARS, CheckpointRecord, ErrorRecord
from trgl_dist.metrics.spans import NullRecorder, Recorder, SpanRecorder
from trgl_dist.rundir import CONFIG_FILE, TRACE_DIR, run_directory
from trgl_dist.runtime import topology as topo
from trgl_dist.runtime.allocator import keep_freed_memory
from trgl_dist.runtime.link import PeerFailure
from trgl_dist.runtime.planes import warm_links
from trgl_dist.runtime.startup import StartFailed, agree_on_plan, broadcast_json, together
from trgl_dist.runtime.watchdog import Watchdog, node_ranks
from trgl_dist.runtime.wiring import Stage, build_stage, run_stage
from trgl_dist.training.snapshot import Resume, restore, save_modules

log = logging.getLogger("trgl_dist")
COORDINATOR_WAIT_S = 60.0
SECRET_ENV = "TRGL_RUN_SECRET"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class Interrupted(BaseException):
    """The launcher stopped this rank (SIGTERM: torchrun does so once any rank has failed).

    A BaseException, like KeyboardInterrupt: no ``except Exception`` on the way (reading a
    checkpoint, say) may take a signal for an error of its own."""


def _start(config: Config, topology: topo.Topology, resume: Resume | None) -> Stage:
    """Build the stage (and restore it); every rank starts, or all stop (startup.together)."""

    def build() -> Stage:
        stage = build_stage(config, topology)
        if resume is not None:
            run_dir = Path(config.train.out)
            step = restore(run_dir, stage.learners, stage.meta, resume.step)[0]
            if step % topology.plan.period:
                raise CheckpointError(
                    f"checkpoint step {step} falls inside a window of --stage-replicas "
                    f"{','.join(map(str, topology.plan.replicas))}: resume from a step that is "
                    f"a multiple of {topology.plan.period}"
                )
            stage.start_step = step
        return stage

    return together(topology, build)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: teardown must not be interrupted
    _stopping()
    raise Interrupted("stopped by SIGTERM")


def _stopping() -> None:
    """The rank is on its way out. The launcher's SIGTERM goes to the rank's whole process
    group, its data-loader workers too; torch's SIGCHLD handler would raise their deaths
    in whatever the rank does next (as an error of its own, or as a traceback at exit)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


@dataclass
class _Services:
    """What a rank must close on the way out."""

    coordinator: CoordinatorProcess | None = None
    client: MetricsClient | None = None
    watchdog: Watchdog | None = None


def run_pipeline(config: Config, resume: Resume | None = None) -> int:
    """One stage of the pipeline. Returns the process exit code (0, 1, 2 or 130)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    keep_freed_memory()  # a steady step then maps no new pages (runtime/allocator.py)
    services = _Services()
    topology = None
    try:
        planned: list[tuple[Config, dict[str, Any]]] = []

        def plan_layout(joined: topo.Topology) -> Layout:
            ran, layout, prediction = agree_on_plan(config, joined)
            planned.append((ran, prediction))
            return layout

        topology = topo.init_distributed(config.pipeline.link_timeout, choose_layout=plan_layout)
        logging.getLogger().handlers[0].setFormatter(
            logging.Formatter(f"%(asctime)s [{topology.where}] %(message)s", "%H:%M:%S")
        )
        ran, prediction = planned[0] if planned else (config, {})
        _train(ran, config, prediction, topology, services, resume)
        code = 0
    except BaseException as err:  # noqa: BLE001 - every failure ends in one report and exit code
        code = _failed(err, topology, services.client)
    return _teardown(code, services)


def _train(
    config: Config,
    given: Config,
    prediction: dict[str, Any],
    topology: topo.Topology,
    services: _Services,
    resume: Resume | None,
) -> None:
    """Train ``config`` (the plan made explicit); the run directory records the split and
    the layout as the user ``given`` them, so a resumed run may lay out its ranks anew."""
    stage = _start(config, topology, resume)
    config = stage.config
    warm_links(topology)  # from this thread, before the link threads exist
    info: dict[str, Any] = {}
    if topology.is_rank_zero:
        recorded = config.replace("pipeline", **{
            key: getattr(given.pipeline, key) for key in ("stage_modules", "stage_replicas")
        })
        info = _start_coordinator(recorded, topology, stage, prediction, services, resume)
    info = broadcast_json(topology, info)
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
        modules = tuple(save_modules(run_dir, step, stage.learners, {}))
        record = CheckpointRecord(step=step, epoch=epoch, stage=topology.stage, modules=modules)
        send(record)

    spans: Recorder = NullRecorder()
    if config.pipeline.trace:
        path = run_dir / TRACE_DIR / f"rank-{topology.rank}.jsonl"
        spans = SpanRecorder(path, rank=topology.rank, label=topology.where)
    try:
        run_stage(config, topology, stage, send, save, spans)
    finally:
        spans.close()
    services.watchdog.stand_down()


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
    prediction: dict[str, Any],
    services: _Services,
    resume: Resume | None,
) -> dict[str, str]:
    bind, connect_host = coordinator_bind(config, topology)
    run_dir = run_directory(config.train.out, config.train.regime, resume is not None)
    write_toml(config, run_dir / CONFIG_FILE)
    secret = run_secret()
    shape = RunShape(
        topology.world_size,
        config.model.modules,
        "pipeline",
        config.pipeline.link_timeout,
        topology.plan.replicas,
    )
    job = CoordinatorJob(
        run_dir,
        shape,
        secret,
        bind=bind,
        append=resume is not None,
        extra={
            "blocks_per_module": stage.counts,
            "stage_replicas": list(topology.plan.replicas),
            "prediction": prediction,
        },
        checkpoints={"meta": stage.meta, "keep": config.train.keep_checkpoints},
        node=node_ranks(topology),
    )
    services.coordinator, addresses = start_coordinator(job, connect_host=connect_host)
    log.info(
        "%d stages (replicas %s), modules of %s blocks, run directory %s",
        topology.num_stages,
        ",".join(map(str, topology.plan.replicas)),
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
    _stopping()
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

