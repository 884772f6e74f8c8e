"""Two torchrun agents on two "hosts" (network namespaces joined by a veth pair), meeting
through a c10d rendezvous: a multi-node run of 2 nodes x 2 ranks on this machine."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trgl_dist.metrics.records import EndRecord, TrainRecord, read_records

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 240
SMALL = ["--dataset", "synthetic", "--model", "resnet-small", "--width", "8",
         "--batch-size", "16", "--modules", "4", "--epochs", "1"]

pytestmark = pytest.mark.slow


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def two_hosts() -> Iterator[list[tuple[str, str, str]]]:
    """Two namespaces, each with one end of a veth pair and an address on a private /24:
    [(namespace, interface, address)] for hosts 0 and 1. Everything is removed afterwards,
    the processes left inside first."""
    tag = f"{os.getpid() % 100_000}"
    subnet = f"10.{77 + os.getpid() % 100}.{os.getpid() % 250}"
    hosts = [(f"trgl{tag}h{i}", f"trgl{tag}v{i}", f"{subnet}.{i + 1}") for i in range(2)]
    try:
        for namespace, _, _ in hosts:
            ip("netns", "add", namespace)
        ip("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for namespace, interface, address in hosts:
            ip("link", "set", interface, "netns", namespace)
            ip("netns", "exec", namespace, "ip", "addr", "add", f"{address}/24", "dev", interface)
            ip("netns", "exec", namespace, "ip", "link", "set", interface, "up")
            ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        yield hosts
    finally:
        for namespace, _, _ in hosts:
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def agent(host: tuple[str, str, str], node: int, master: str, port: int, args: list[str],
          log: Path) -> subprocess.Popen[bytes]:
    namespace, interface, address = host
    env = {**os.environ, "GLOO_SOCKET_IFNAME": interface, "OMP_NUM_THREADS": "1"}
    command = [
        "ip", "netns", "exec", namespace, sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d",
        f"--rdzv_endpoint={master}:{port}", f"--rdzv_id=trgl{os.getpid()}-{port}",
        f"--rdzv_conf=is_host={1 if node == 0 else 0}", f"--local_addr={address}",
        "-m", "trgl_dist.train", *args,
    ]
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            cwd=REPO)


def run_two_nodes(hosts: list[tuple[str, str, str]], args: list[str], tmp: Path, port: int
                  ) -> tuple[list[int], str]:
    master = hosts[0][2]
    logs = [tmp / f"node{node}.log" for node in range(2)]
    agents = [agent(hosts[n], n, master, port, args, logs[n]) for n in range(2)]
    deadline = time.monotonic() + DEADLINE_S
    try:
        while any(a.poll() is None for a in agents) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(a.poll() is not None for a in agents), "an agent is still running"
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
            a.wait()
    return [a.returncode for a in agents], "".join(log.read_text() for log in logs)


def test_two_agents_meet_and_every_stage_reports(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with two_hosts() as hosts:
        codes, output = run_two_nodes(hosts, [*SMALL, "--out", str(out)], tmp_path, 29_511)
    assert codes == [0, 0], output
    records = read_records(out / "metrics.jsonl")
    assert {r.stage for r in records if isinstance(r, TrainRecord)} == {0, 1, 2, 3}
    assert sorted(r.stage for r in records if isinstance(r, EndRecord)) == [0, 1, 2, 3]
    assert "Results (pipeline, 4 modules)" in output


def test_a_loopback_coordinator_across_nodes_is_refused_in_one_line(tmp_path: Path) -> None:
    args = [*SMALL, "--coordinator", "tcp://127.0.0.1:0", "--out", str(tmp_path / "run")]
    with two_hosts() as hosts:
        codes, output = run_two_nodes(hosts, args, tmp_path, 29_512)
    assert all(code != 0 for code in codes), output
    assert "error: pipeline.coordinator: tcp://127.0.0.1:0 is a loopback address" in output
