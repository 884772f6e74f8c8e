"""The machine, and the results: <device>_check.json and .md, the README's table."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import torch
from benchenv import cpu_model, markdown_table, splice_readme
from judge import Outcome

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MARKERS = {
    "cpu": ("<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"),
    "cuda": ("<!-- gpu-check-cuda:begin -->", "<!-- gpu-check-cuda:end -->"),
}
#: Asked in a child process, so the check itself never holds a CUDA context.
_PROBE = """
import json, torch
ok = torch.cuda.is_available()
n = torch.cuda.device_count() if ok else 0
print(json.dumps({
    "available": ok, "count": n,
    "names": [torch.cuda.get_device_name(i) for i in range(n)],
    "cuda": torch.version.cuda,
    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if ok else None,
}))
"""


def probe_gpus(env: dict[str, str]) -> dict[str, Any]:
    """The GPUs a child process sees, with names and the CUDA and NCCL versions."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        return {"available": False, "count": 0, "names": [], "error": done.stderr[-500:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def machine(device: str, gpus: dict[str, Any], command: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "cpu_model": cpu_model(),
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": command,
    }
    if device == "cuda":
        info.update(
            gpu_count=gpus["count"],
            gpu_names=gpus["names"],
            cuda=gpus.get("cuda"),
            nccl=gpus.get("nccl"),
        )
    return info


def where(info: dict[str, Any]) -> str:
    if info["device"] == "cuda":
        names = ", ".join(sorted(set(info["gpu_names"])))
        return f"{info['gpu_count']} x {names} (CUDA {info['cuda']}, NCCL {info['nccl']})"
    return f"CPU only: {info['cpu_model']}, {info['cpus']} CPUs, {info['memory_gib']} GiB"


def markdown(results: dict[str, Any]) -> str:
    info = results["machine"]
    rows = [
        (c["check"], f"**{c['status']}**", c["text"].replace("|", "\\|")) for c in results["checks"]
    ]
    head = (
        f"{results['passed']}/{results['total']} checks passed in "
        f"{results['seconds']:.0f} s on {where(info)}; torch {info['torch']}, "
        f"{info['platform']}. Command: `{info['command']}`\n\n"
    )
    return head + markdown_table("check | status | numbers", rows)


def write_results(
    results_dir: Path, device: str, outcomes: list[Outcome], extra: dict[str, Any]
) -> Path:
    """Write <device>_check.json and .md; into the README too when in the default folder."""
    checks = [
        {"check": o.check, "status": o.status, "text": o.text, "numbers": o.numbers}
        for o in outcomes
    ]
    passed = sum(o.passed for o in outcomes)
    results = {"passed": passed, "total": len(outcomes), "checks": checks, **extra}
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{device}_check.json"
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    table = markdown(results)
    (results_dir / f"{device}_check.md").write_text(table)
    if results_dir.resolve() == RESULTS.resolve():
        splice_readme(HERE / "README.md", table, *MARKERS[device])
    return path
