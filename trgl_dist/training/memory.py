"""Peak memory of a stage: the allocator's on GPU; on CPU the peak RSS and a tensor account."""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

from trgl_dist.training.learner import ModuleLearner

MIB = 2**20
T = TypeVar("T")


def state_bytes(learners: Sequence[ModuleLearner]) -> int:
    """Bytes of the parameters, gradients and optimizer state of ``learners``, each tensor
    once (e2e's learners share one optimizer)."""
    unique = {id(t): t for lr in learners for t in _state_tensors(lr)}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _state_tensors(learner: ModuleLearner) -> Iterator[torch.Tensor]:
    for p in learner.module.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
    for state in learner.optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss
    over fork and exec, so a torchrun worker would report at least its launcher's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peak_mb(device: torch.device) -> float | None:
    """The CUDA allocator's peak since the last reset on ``device`` (None off GPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / MIB


def reset_cuda_peak(device: torch.device) -> None:
    """Start a new peak window (each epoch's peak is then its own)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def tracked_peak_mb(
    run: Callable[[], T],
    tracked: Sequence[torch.nn.Module | torch.optim.Optimizer | torch.Tensor],
    device: torch.device,
) -> tuple[T, float]:
    """``run()``'s result and the peak MiB of tensors alive on ``device`` while it ran: those
    it creates and the ``tracked`` modules' parameters, gradients and buffers, optimizers'
    state and tensors, measured on the real tensors by torch's MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*tracked)
    with tracker:
        out = run()
    peak = tracker.get_tracker_snapshot("peak")
    key = device if device.type != "cuda" or device.index is not None else torch.device("cuda", 0)
    return out, peak.get(key, {}).get("Total", 0) / MIB
