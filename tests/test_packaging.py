"""Installing the package keeps the torch a user already has (a cluster's, built for its CUDA)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Another torch 2.x, as a CPU wheel on this machine's disk (see the machine notes); its
#: matching torchvision comes from the package index.
OTHER_TORCH = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
OTHER_TORCHVISION = "torchvision==0.28.0"

pytestmark = pytest.mark.slow


def pip(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True, text=True, timeout=600, check=True,
    )


def test_installing_keeps_an_installed_torch_and_torchvision(tmp_path: Path) -> None:
    assert OTHER_TORCH.is_file(), f"{OTHER_TORCH} is part of this machine's set-up"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip(venv, "install", "-q", str(OTHER_TORCH))
    pip(venv, "install", "-q", "--no-deps", OTHER_TORCHVISION)
    report = tmp_path / "report.json"
    pip(venv, "install", "-q", "--dry-run", "--report", str(report), "-e", str(REPO))
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "trgl_dist" in planned or "trgl-dist" in planned
    assert "torch" not in planned and "torchvision" not in planned, planned


def test_the_set_up_pins_the_tested_releases_and_the_package_does_not() -> None:
    constraints = (REPO / "launch" / "constraints.txt").read_text()
    assert "torch==2.14.1" in constraints and "torchvision==0.29.1" in constraints
    assert "-c launch/constraints.txt" in (REPO / "launch" / "setup.sh").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch>=' in pyproject and "torch==" not in pyproject
