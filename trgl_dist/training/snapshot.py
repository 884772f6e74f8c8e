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


def run_meta(config: Config, counts: Sequence[int], spec: InputSpec) -> dict[str, Any]:
    """What a checkpoint must agree on with the run that resumes it (and what export reads):
    the model and its split into modules, not the layout of ranks that ran it. The pipeline
    is the `parallel` regime spread over processes: either resumes the other's checkpoint."""
    regime = config.train.regime
    return {
        "model": config.model.name,
        "modules": config.model.modules,
        "blocks_per_module": list(counts),
        "regime": "parallel" if regime == "pipeline" else regime,
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


def save_modules(
    run_dir: Path, step: int, learners: Sequence[ModuleLearner], position: dict[str, Any]
) -> list[int]:
    """One file per module of ``learners``, each with the writer's RNG and the run's position;
    returns the modules written."""
    rng = ckpt.rng_state(device_of(learners))
    for learner in learners:
        state = {"learner": learner.state_dict(), "rng": rng, "step": step, "position": position}
        ckpt.save_module(run_dir, step, learner.index, state)
    return [learner.index for learner in learners]


def single_process_saver(
    run_dir: Path, learners: Sequence[ModuleLearner], meta: dict[str, Any], keep: int
) -> SaveCheckpoint:
    """save(step, position) for the one-process regimes: every module's file, then the
    manifest."""
    saved: set[int] = set()

    def save(step: int, position: dict[str, Any]) -> None:
        if step in saved:
            return
        save_modules(run_dir, step, learners, position)
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
    step: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """Load the modules of ``learners`` from a complete checkpoint (the newest, or ``step``),
    whatever layout of ranks wrote it; returns (step, position). Any mismatch raises
    CheckpointError with one line; an unreadable file names the newest older checkpoint whose
    files of these modules are intact."""
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
    states = []
    for learner in learners:
        try:
            states.append(ckpt.load_module(run_dir, step, learner.index))
        except CheckpointError as err:
            hint = _older_intact(run_dir, complete, step, learners)
            raise CheckpointError(f"{err}{hint}") from None
    for learner, state in zip(learners, states, strict=True):
        try:
            learner.load_state_dict(state["learner"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint step {step}, module {learner.index + 1}: "
                f"does not fit ({first_line(err)})"
            ) from None
    if states:
        ckpt.restore_rng(states[0]["rng"], device_of(learners))
    log.info("resuming from checkpoint step %d", step)
    return step, dict(states[0].get("position", {})) if states else {}


def _older_intact(
    run_dir: Path, complete: Sequence[int], step: int, learners: Sequence[ModuleLearner]
) -> str:
    """"; ... resume from step K" for the newest older checkpoint whose files of these
    modules load, or "" when there is none."""
    for older in reversed([s for s in complete if s < step]):
        try:
            for learner in learners:
                ckpt.load_module(run_dir, older, learner.index)
        except CheckpointError:
            continue
        return (
            f"; the newest intact checkpoint is step {older}: continue from it with "
            f"--resume {run_dir} --resume-step {older}"
        )
    return ""
