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
from tracker import MIB, Network, e2e_parts, e2e_step, lockstep_step, stage_step

from trgl_dist.network.models import build_backbone
from trgl_dist.network.modules import build_modules
from trgl_dist.training.learner import ModuleLearner, taus


def available() -> bool:
    return torch.cuda.is_available()


def build_real(
    setting: Setting, modules: int, split: str, method: str, device: torch.device
) -> Network:
    """The K modules and learners as real tensors on ``device``."""
    name, loss = method_parts(method)
    config = setting.config(modules, name)
    counts = block_counts(setting, modules, split)
    backbone = build_backbone(setting.model, setting.spec, num_modules=modules, width=setting.width)
    mods = [m.to(device) for m in build_modules(backbone, counts, setting.spec)]
    tau = taus(config, modules)
    learners = [ModuleLearner(k, m, config, tau[k]) for k, m in enumerate(mods)]
    # No fake mode: a null context where tracker.py enters one.
    return Network(config, setting.spec, learners, contextlib.nullcontext(), loss)  # type: ignore[arg-type]


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
    """Parameters, gradients and optimizer state of the given modules (resident between steps)."""
    total = 0
    for k in stages:
        learner = net.learners[k]
        for p in learner.module.parameters():
            total += p.numel() * p.element_size() * (2 if p.grad is not None else 1)
        for state in learner.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total / MIB


def measure(setting: Setting, modules: int, split: str, method: str) -> dict[str, Any]:
    """Real peaks (MiB) of E2E, the lock-step step and each stage's training step."""
    device = torch.device("cuda")
    net = build_real(setting, modules, split, method, device)
    all_modules = list(range(modules))
    out: dict[str, Any] = {}
    lock = peak_mib(lockstep_step(net, setting.batch_size), device)
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
    e2e = build_real(setting, modules, "equal-depth", "vanilla", device)
    _, optimizer = e2e_parts(e2e)
    e2e_peak = peak_mib(e2e_step(e2e, setting.batch_size, optimizer), device)
    out["e2e"] = e2e_peak + state_mib(e2e, all_modules) + optimizer_mib(optimizer)
    return out


def optimizer_mib(optimizer: torch.optim.Optimizer) -> float:
    return (
        sum(
            v.numel() * v.element_size()
            for state in optimizer.state.values()
            for v in state.values()
            if torch.is_tensor(v)
        )
        / MIB
    )
