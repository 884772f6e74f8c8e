"""Stage checkpoint files: written atomically, read with ``torch.load(weights_only=True)``.

The layout and the manifest that declares a checkpoint complete live in manifest.py.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from trgl_dist.atomic import atomic_write
from trgl_dist.checkpoints.manifest import module_file
from trgl_dist.errors import CheckpointError, StorageError, first_line

log = logging.getLogger(__name__)


def save_module(run_dir: Path, step: int, module: int, state: dict[str, Any]) -> Path:
    """Write one module's state atomically; a full disk is a StorageError naming the file,
    with no temporary file left behind and every earlier checkpoint as it was."""
    path = module_file(run_dir, step, module)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(path.parent, err) from None
    return atomic_write(path, lambda out: torch.save(state, out))


def load_module(run_dir: Path, step: int, module: int) -> dict[str, Any]:
    """One module's state of checkpoint ``step``; anything unreadable is a CheckpointError
    naming the file, in one line."""
    path = module_file(run_dir, step, module)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except pickle.UnpicklingError:
        # weights-only loading refused something other than tensors and plain containers
        raise CheckpointError(
            f"{path}: not a trgl_dist checkpoint (it holds objects other than tensors, "
            "which are never unpickled)"
        ) from None
    except Exception as err:  # noqa: BLE001 - truncated, corrupted or foreign: one line
        raise CheckpointError(
            f"{path}: cannot be loaded (corrupted or truncated?): {first_line(err)}"
        ) from None
    if not isinstance(state, dict) or "learner" not in state:
        raise CheckpointError(f"{path}: not a trgl_dist module checkpoint")
    return state


def rng_state(device: torch.device) -> dict[str, Any]:
    """The CPU generator's state, and that of this stage's GPU only: another rank owns each
    other GPU, and a resumed run may see its GPUs in another order."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if device.type == "cuda" and isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda, device)
