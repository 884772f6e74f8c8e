"""Checkpoint layout and manifests (no torch here, so the coordinator can write them).

Layout: RUN_DIR/checkpoints/step-N/module-K.pt (one file per module, K from 0) and
RUN_DIR/checkpoints/step-N/manifest.json. Files per module, not per rank: a run resumes under
another layout of ranks, stages or replicas. A step directory without its manifest is
incomplete and ignored, so a run killed at any instant leaves the last complete checkpoint
loadable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from trgl_dist.atomic import atomic_write
from trgl_dist.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 1: one file per stage (earlier releases)


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def module_file(run_dir: Path, step: int, module: int) -> Path:
    return step_dir(run_dir, step) / f"module-{module}.pt"


def write_manifest(run_dir: Path, step: int, meta: dict[str, Any], keep: int = 0) -> Path:
    """Declare step ``step`` complete (after every module's file is on disk); prune old
    ones."""
    directory = step_dir(run_dir, step)
    modules = int(meta["modules"])
    missing = [k + 1 for k in range(modules) if not module_file(run_dir, step, k).exists()]
    if missing:
        raise CheckpointError(f"checkpoint step {step}: the files of modules {missing} are missing")
    text = json.dumps({"format": FORMAT_VERSION, "step": step, **meta}, indent=1).encode()
    atomic_write(directory / MANIFEST, lambda out: out.write(text))
    prune(run_dir, keep)
    return directory / MANIFEST


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (0: all), and drop the step directories
    older than the newest complete one that never got their manifest: a run stopped mid-save
    leaves them, and nothing would ever read them."""
    complete = complete_steps(run_dir)
    if not complete:
        return
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [s for s in step_directories(run_dir) if s < complete[-1] and s not in complete]
    for step in doomed:
        shutil.rmtree(step_dir(run_dir, step), ignore_errors=True)


def step_directories(run_dir: Path) -> list[int]:
    """Every step directory, complete or not, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        if child.name.startswith("step-") and child.name[5:].isdigit():
            steps.append(int(child.name[5:]))
    return sorted(steps)


def complete_steps(run_dir: Path) -> list[int]:
    """Steps with a manifest, oldest first."""
    return [s for s in step_directories(run_dir) if (step_dir(run_dir, s) / MANIFEST).is_file()]


def read_manifest(run_dir: Path, step: int) -> dict[str, Any]:
    path = step_dir(run_dir, step) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err})") from None
    if isinstance(manifest, dict) and manifest.get("format") == 1:
        raise CheckpointError(
            f"{path}: written by an earlier release (one file per stage, format 1); this "
            f"release reads format {FORMAT_VERSION} (one file per module)"
        )
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: not a trgl_dist checkpoint manifest of format {FORMAT_VERSION}"
        )
    return manifest


def latest(run_dir: Path) -> tuple[int, dict[str, Any]] | None:
    """The newest complete checkpoint (step, manifest), or None."""
    steps = complete_steps(run_dir)
    if not steps:
        return None
    return steps[-1], read_manifest(run_dir, steps[-1])


def check_compatible(manifest: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a checkpoint of another model, module count or split, naming the difference."""
    for key, value in expected.items():
        saved = manifest.get(key)
        if isinstance(value, tuple):
            value = list(value)
        if saved != value:
            raise CheckpointError(
                f"checkpoint step {manifest.get('step')} was written with {key}={saved!r}, "
                f"this run has {key}={value!r}"
            )
