"""Peak training memory by category, from MemTracker under fake tensors (no compute, no RAM).

The fake network and the tracking are the package's (trgl_dist/planning/memory.py); the
steps here are those the comparison needs: ``ModuleLearner.train_step`` and
``end_to_end``, a stage's step with its batch buffers, and its test-pass step."""

from __future__ import annotations

import torch
from torch import Tensor

from trgl_dist.planning.memory import (  # noqa: F401 - the benchmark's scripts import them here
    CATEGORIES,
    Network,
    Step,
    build_fake,
    build_in,
    input_shape,
    output_shape,
    peak_of,
)
from trgl_dist.training.memory import MIB  # noqa: F401


def training_step(net: Network, batch_size: int) -> Step:
    """One batch of the network's regime on fresh data (``Network.trainer``). In the
    lock-step regime module k+1 trains on k's detached output while the loop still holds
    the data batch and that output."""
    s = net.spec
    trainer = net.trainer()

    def run() -> None:
        x = torch.randn(batch_size, s.channels, s.size, s.size)
        y = torch.randint(0, s.num_classes, (batch_size,))
        trainer(x, y)

    return run


def stage_step(net: Network, stage: int, batch_size: int, buffers: list[Tensor]) -> Step:
    """One training step of pipeline stage ``stage`` (one module) on an input of the previous
    module's output shape, while ``buffers`` (pass them to the tracker too) stay allocated."""
    learner = net.learners[stage]
    in_shape = input_shape(net, stage)
    s = net.spec

    def run() -> None:
        assert buffers is not None  # held for the whole step, like a full inbox and outbox
        x = torch.randn(batch_size, *in_shape)
        y = torch.randint(0, s.num_classes, (batch_size,))
        learner.train_step(x, y)

    return run


def stage_eval_step(net: Network, stage: int, batch_size: int, buffers: list[Tensor]) -> Step:
    """One test-pass step of stage ``stage``: ``ModuleLearner.eval_step`` (no grad)."""
    learner = net.learners[stage]
    in_shape = input_shape(net, stage)
    s = net.spec

    def run() -> None:
        assert buffers is not None
        x = torch.randn(batch_size, *in_shape)
        y = torch.randint(0, s.num_classes, (batch_size,))
        learner.eval_step(x, y)

    return run


def fake_batches(net: Network, shape: tuple[int, ...], batch_size: int, count: int) -> list[Tensor]:
    """``count`` wire batches as fake tensors: activations (B, *shape), labels and sample ids."""
    with net.mode:
        out: list[Tensor] = []
        for _ in range(count):
            out.append(torch.empty(batch_size, *shape))
            out.append(torch.empty(batch_size, dtype=torch.int64))  # labels
            out.append(torch.empty(batch_size, dtype=torch.int64))  # sample ids
    return out
