"""What the memory and overhead benchmarks share: the network setting they build with
trgl_dist, the description of the machine, and copying generated markdown into a README."""

from __future__ import annotations

import json
import logging
import platform
import sys
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


def splice_readme(readme: Path, markdown: str) -> None:
    """Put ``markdown`` between the README's results markers, verbatim."""
    if not readme.exists():
        return
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        log.warning("%s has no results markers; left as it is", readme)
        return
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{BEGIN}\n{markdown}{END}{tail}")


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
