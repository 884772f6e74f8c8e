"""What the benchmarks share: copying generated markdown into a README (all of them); for
the memory and overhead benchmarks also the network setting they build with trgl_dist, the
command line and main of their run.py, the description of the machine and markdown tables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from trgl_dist.config import Config
from trgl_dist.network.models import InputSpec

log = logging.getLogger("benchmarks")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


@dataclass(frozen=True)
class NetworkSetting:
    """The model, input and batch every configuration of one benchmark run shares."""

    model: str = "resnet110"
    channels: int = 3
    size: int = 32
    num_classes: int = 10
    width: int = 0
    batch_size: int = 64

    @property
    def spec(self) -> InputSpec:
        return InputSpec(self.channels, self.size, self.num_classes)

    def config(self, modules: int, method: str) -> Config:
        return (
            Config()
            .replace("model", name=self.model, modules=modules, width=self.width)
            .replace("method", name=method)
            .replace("data", batch_size=self.batch_size)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def environment(script: str, **extra: Any) -> dict[str, Any]:
    """Library versions, machine and the exact command (``python SCRIPT ARGS``)."""
    import psutil
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "libc": " ".join(platform.libc_ver()),
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        **extra,
        "command": " ".join(["python", script, *sys.argv[1:]]),
    }


def environment_lines(env: dict[str, Any]) -> str:
    """Machine, versions and the exact command, from the results file."""
    return (
        f"Machine: {env['cpu_model']}, {env['cpus']} CPUs, {env.get('memory_gib', '?')} GiB, "
        f"{env['platform']}, {env['libc']}. Python {env['python']}, torch {env['torch']}, "
        f"torchvision {env['torchvision']}. Command: `{env['command']}`\n"
    )


def markdown_table(header: str, rows: Iterable[Sequence[str]]) -> str:
    """A markdown table, one line per row, ending in a newline. ``header``: the column
    names, separated by `` | `` as in the table."""
    columns = len(header.split(" | "))
    head = f"| {header} |\n" + "|---" * columns + "|\n"
    return head + "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def script_parser(doc: str, folder: Path, *, size: int, quick: str) -> argparse.ArgumentParser:
    """The flags every run.py here shares: the preset, the network setting, the K values,
    where to write, and --render."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--model", default="resnet110")
    p.add_argument("--size", type=int, default=size, help="input side (3 x size x size)")
    p.add_argument("--width", type=int, default=0, help="0: the model's default width")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--modules", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--out", type=Path, default=folder / "results")
    p.add_argument("--render", type=Path, help="only rewrite the markdown of this results JSON")
    return p


def run_script(
    args: argparse.Namespace,
    folder: Path,
    name: str,
    measure: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
) -> None:
    """A run.py's main: with --render, only the markdown of that results JSON; else
    ``measure`` (timed) into OUT/NAME.json and .md (``NAME_quick`` with --quick)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.render:
        results = json.loads(args.render.read_text())
        write_outputs(results, report(results), args.render.parent, args.render.stem, folder, name)
        return
    started = time.perf_counter()
    results = measure(args)
    results["seconds"] = time.perf_counter() - started
    stem = f"{name}_quick" if args.quick else name
    write_outputs(results, report(results), args.out, stem, folder, name)
    log.info("wrote %s in %.0f s", args.out / f"{stem}.md", results["seconds"])


def splice_readme(readme: Path, markdown: str, begin: str = BEGIN, end: str = END) -> bool:
    """Put ``markdown`` between the README's markers ``begin`` and ``end``, verbatim.
    False, the README left as it is, when it or its markers are missing."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    if begin not in text or end not in text:
        log.warning("%s has no %s markers; left as it is", readme, begin)
        return False
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{begin}\n{markdown.rstrip()}\n{end}{tail}")
    return True


def write_outputs(
    results: dict[str, Any], markdown: str, out: Path, name: str, folder: Path, full_name: str
) -> None:
    """OUT/NAME.json and OUT/NAME.md; the full run's markdown (``full_name`` written into
    the folder's own results/) also goes into the folder's README."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{name}.md").write_text(markdown)
    if out.resolve() == (folder / "results").resolve() and name == full_name:
        splice_readme(folder / "README.md", markdown)


REPO = Path(__file__).resolve().parents[1]


def child_environment(threads: int | None) -> dict[str, str]:
    """A benchmark's child process: the package importable from the checkout, ``threads``
    per process (OMP_NUM_THREADS), or None for torch's default with every thread-count
    variable removed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def torchrun(nproc: int) -> list[str]:
    """The launcher's command line, single node, ``nproc`` ranks."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}",
    ]  # fmt: skip
