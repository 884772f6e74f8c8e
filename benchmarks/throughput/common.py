"""What every throughput experiment shares: the run's settings, the model, the batch stream."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trgl_dist.config import Config
from trgl_dist.data import build_datasets, make_loader
from trgl_dist.network.modules import LocalModule
from trgl_dist.training.build import build_network
from trgl_dist.training.learner import Trainer


@dataclass(frozen=True)
class Setting:
    """Model, data and work: identical for every experiment of one benchmark run."""

    model: str = "resnet110"
    width: int = 0
    modules: int = 2
    split_counts: tuple[int, ...] = ()
    batch_size: int = 64
    steps: int = 30  # optimizer steps per module, warm-up included
    warmup: int = 3  # steps excluded from the in-process timings
    seed: int = 0

    def flags(self) -> list[str]:
        """The trgl_dist.train flags of this setting: synthetic data, one epoch of ``steps``
        steps, one test pass after it (``--eval-every 0``) of one small batch, one train
        record per module at the end."""
        flags = [
            "--model", self.model, "--modules", str(self.modules), "--dataset", "synthetic",
            "--batch-size", str(self.batch_size), "--max-steps", str(self.steps),
            "--seed", str(self.seed), "--synthetic-train", str(self.train_samples()),
            "--synthetic-test", str(self.batch_size), "--log-every", str(self.steps),
            "--width", str(self.width), "--eval-every", "0",
        ]  # fmt: skip
        if self.split_counts:
            flags += ["--split-counts", ",".join(map(str, self.split_counts))]
        return flags

    def train_samples(self) -> int:
        """One epoch holds every step: no epoch boundary (test pass) inside the timing."""
        return self.batch_size * self.steps

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Setting:
        raw = json.loads(text)
        raw["split_counts"] = tuple(raw["split_counts"])
        return Setting(**raw)


def setting_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--setting", type=Setting.from_json, required=True, help="Setting JSON")


def config_of(setting: Setting, regime: str) -> Config:
    """The package's own config for this setting, as trgl_dist.train would resolve it."""
    from trgl_dist import cli

    config, _ = cli.parse([*setting.flags(), "--regime", regime])
    return config


def build(setting: Setting, regime: str) -> tuple[Config, list[LocalModule], Any]:
    """Config, the K modules (seeded like trgl_dist.train) and the training set."""
    config = config_of(setting, regime)
    torch.manual_seed(config.train.seed)
    train_set, _test_set, spec = build_datasets(config.data, config.train.seed)
    modules, _counts = build_network(config, spec)
    return config, modules, train_set


def batches(config: Config, train_set: Any) -> Iterator[tuple[Tensor, Tensor]]:
    """The training batches of epoch 0, from the package's loader as the regimes make it
    on a CPU (no worker processes)."""
    loader = make_loader(
        train_set, config.data.batch_size, train=True, seed=config.train.seed, epoch=0
    )
    for x, y, _ids in loader:
        yield x, y


def timed_steps(step: Trainer, data: Iterator, setting: Setting) -> dict:
    """Run ``setting.steps`` steps (loading included); time the ones after the warm-up."""
    started = 0.0
    samples = 0
    for index, (x, y) in enumerate(data):
        if index == setting.warmup:
            started = time.perf_counter()
        step(x, y)
        if index >= setting.warmup:
            samples += len(y)
        if index + 1 >= setting.steps:
            break
    seconds = time.perf_counter() - started
    return {"samples_per_s": samples / seconds, "timed_steps": setting.steps - setting.warmup}


class MachineLoad:
    """How busy the machine was with other work while a benchmark ran: the CPU seconds every
    process used (``/proc/stat``) minus this process's and its waited-for descendants'
    (``getrusage``), and the hypervisor's steal time."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.busy, self.steal = _cpu_busy()
        self.own = _own_cpu()

    def result(self) -> dict[str, float]:
        busy, steal = _cpu_busy()
        seconds = time.monotonic() - self.started
        cores = os.cpu_count() or 1
        others = max(busy - self.busy - (_own_cpu() - self.own), 0.0)
        return {
            "seconds": seconds,
            "other_cpu_s": others,
            "other_share": others / (seconds * cores) if seconds > 0 else 0.0,
            "steal_s": steal - self.steal,
            "loadavg_end": os.getloadavg()[0],
        }


def _cpu_busy() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _own_cpu() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def measure_and_write(
    args: argparse.Namespace,
    name: str,
    measure: Callable[[argparse.Namespace], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
    readme: Path,
) -> Path:
    """Measure (or, with ``args.render``, reread ``args.results/NAME.json``), write NAME.json
    and NAME.md into ``args.results``, and, when that is the folder's own results/, the
    README's block between its ``NAME`` markers. Returns the markdown's path."""
    from benchenv import splice_readme  # benchmarks/ is on the path of the scripts only

    path = args.results / f"{name}.json"
    if args.render:
        result = json.loads(path.read_text())
    else:
        started, load = time.perf_counter(), MachineLoad()
        result = measure(args)
        result["seconds"] = time.perf_counter() - started
        result["machine_load"] = load.result()
        write_json(path, result)
    table = markdown(result)
    out = args.results / f"{name}.md"
    out.write_text(table.rstrip() + "\n")
    if args.results.resolve() == (readme.parent / "results").resolve():
        splice_readme(readme, table, f"<!-- {name}:begin -->", f"<!-- {name}:end -->")
    return out
