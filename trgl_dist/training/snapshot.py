"""What one stage (or the single process) saves and restores: its learners, RNG and position."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trgl_dist.checkpoints import files as ckpt
from trgl_dist.checkpoints import manifest as layout
from trgl_dist.config import Config
from trgl_dist.errors import CheckpointError, first_line
from trgl_dist.network.models import InputSpec
from trgl_dist.training.learner import ModuleLearner

log = logging.getLogger(__name__)
#: save(step, position): write a checkpoint; position is what a resumed run needs beyond step
SaveCheckpoint = Callable[[int, dict[str, Any]], None]


def run_meta(
    config: Config, counts: Sequence[int], spec: InputSpec, stages: int
) -> dict[str, Any]:
    """What a checkpoint must agree on with the run that resumes it (and what export reads)."""
    return {
        "model": config.model.name,
        "modules": config.model.modules,
        "blocks_per_module": list(counts),
        "regime": config.train.regime,
        "stages": stages,
        "dataset": config.data.dataset,
        "input": [spec.channels, spec.size, spec.size],
        "num_classes": spec.num_classes,
    }


def device_of(learners: Sequence[ModuleLearner]) -> torch.device:
    """The device the stage's modules live on."""
    for learner in learners:
        for p in learner.module.parameters():
            return p.device
    return torch.device("cpu")


def stage_state(learners: Sequence[ModuleLearner], step: int, position: dict[str, Any]) -> dict:
    return {
        "learners": {str(learner.index): learner.state_dict() for learner in learners},
        "rng": ckpt.rng_state(device_of(learners)),
        "step": step,
        "position": position,
    }


def single_process_saver(
    run_dir: Path, learners: Sequence[ModuleLearner], meta: dict[str, Any], keep: int
) -> SaveCheckpoint:
    """save(step, position) for the one-process regimes: the stage file, then the manifest."""
    saved: set[int] = set()

    def save(step: int, position: dict[str, Any]) -> None:
        if step in saved:
            return
        ckpt.save_stage(run_dir, step, 0, stage_state(learners, step, position))
        layout.write_manifest(run_dir, step, {**meta, "position": position}, keep)
        saved.add(step)

    return save


@dataclass(frozen=True)
class Resume:
    """Continue a run from a checkpoint: the newest complete one, or ``step``."""

    step: int | None = None


def restore(
    run_dir: Path,
    learners: Sequence[ModuleLearner],
    meta: dict[str, Any],
    stage: int,
    step: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """Load this stage's part of a complete checkpoint (the newest, or ``step``) into
    ``learners``; returns (step, position). Any mismatch raises CheckpointError with one
    line; an unreadable file names the newest older checkpoint whose file is intact."""
    complete = layout.complete_steps(run_dir)
    if not complete:
        raise CheckpointError(f"{run_dir}: no complete checkpoint to resume from")
    if step is None:
        step = complete[-1]
    elif step not in complete:
        raise CheckpointError(
            f"--resume-step {step}: {run_dir} has no complete checkpoint at that step "
            f"(complete: {', '.join(map(str, complete))})"
        )
    layout.check_compatible(layout.read_manifest(run_dir, step), meta)
    try:
        state = ckpt.load_stage(run_dir, step, stage)
    except CheckpointError as err:
        raise CheckpointError(f"{err}{_older_intact(run_dir, complete, step, stage)}") from None
    for learner in learners:
        saved = state["learners"].get(str(learner.index))
        if saved is None:
            raise CheckpointError(f"checkpoint step {step} has no module {learner.index + 1}")
        try:
            learner.load_state_dict(saved)
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint step {step}, module {learner.index + 1}: "
                f"does not fit ({first_line(err)})"
            ) from None
    ckpt.restore_rng(state["rng"], device_of(learners))
    log.info("resuming from checkpoint step %d", step)
    return step, dict(state.get("position", {}))


def _older_intact(run_dir: Path, complete: Sequence[int], step: int, stage: int) -> str:
    """"; ... resume from step K" for the newest older checkpoint whose file of ``stage``
    loads, or "" when there is none."""
    for older in reversed([s for s in complete if s < step]):
        try:
            ckpt.load_stage(run_dir, older, stage)
        except CheckpointError:
            continue
        return (
            f"; the newest intact checkpoint is step {older}: continue from it with "
            f"--resume {run_dir} --resume-step {older}"
        )
    return ""
