"""Where a GPU exists: the allocator's real peak (``torch.cuda.max_memory_allocated``).

The same steps as the fake-tensor estimate (``tracker.py``), on real modules on the GPU:
one step to create gradients and momentum, then the peak of the second step. Only the
total is known (no categories). Not exercised on the CPU-only machine of the results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from experiments import Setting, block_counts, method_parts, stage_buffers
from tracker import MIB, Network, build_in, stage_step, training_step

from trgl_dist.training.memory import state_bytes


def available() -> bool:
    return torch.cuda.is_available()


def build_real(
    setting: Setting, modules: int, split: str, method: str, device: torch.device, regime: str
) -> Network:
    """The K modules and learners of ``regime`` as real tensors on ``device``."""
    name, loss = method_parts(method)
    config = setting.config(modules, name).replace("train", regime=regime)
    counts = block_counts(setting, modules, split)
    # No fake mode: a null context where tracker.py enters one.
    net = build_in(contextlib.nullcontext(), config, setting.spec, counts, loss)
    for module in net.modules:
        module.to(device)
    return net


def peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """Allocator peak of the second call of ``step``, above what was allocated before it."""
    with torch.device(device):
        step()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MIB


def state_mib(net: Network, stages: list[int]) -> float:
    """Parameters, gradients and optimizer state of the given modules (resident between
    steps): the package's ``state_bytes``, with an optimizer the learners share (E2E)
    counted once."""
    learners = [net.learners[k] for k in stages]
    total = state_bytes(learners)
    shared = len(learners) - len({id(learner.optimizer) for learner in learners})
    return (total - shared * optimizer_bytes(learners[-1].optimizer)) / MIB


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )


def measure(setting: Setting, modules: int, split: str, method: str) -> dict[str, Any]:
    """Real peaks (MiB) of E2E, the lock-step step and each stage's training step."""
    device = torch.device("cuda")
    net = build_real(setting, modules, split, method, device, "parallel")
    all_modules = list(range(modules))
    out: dict[str, Any] = {}
    lock = peak_mib(training_step(net, setting.batch_size), device)
    out["lockstep"] = lock + state_mib(net, all_modules)
    stages = []
    for k in all_modules:
        with torch.device(device):  # shapes, buffers and inputs on the GPU
            held = stage_buffers(net, k, setting.batch_size, setting.buffer_size)
            step = stage_step(net, k, setting.batch_size, held)
        held_mib = sum(t.numel() * t.element_size() for t in held) / MIB
        stages.append(peak_mib(step, device) + state_mib(net, [k]) + held_mib)
        del held
    out["stages"] = stages
    e2e = build_real(setting, modules, "equal-depth", "vanilla", device, "e2e")
    out["e2e"] = peak_mib(training_step(e2e, setting.batch_size), device) + state_mib(
        e2e, all_modules
    )
    return out
