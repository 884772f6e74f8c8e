"""Peak training memory by category, from MemTracker under fake tensors (no compute, no RAM).

The steps are the package's own: ``ModuleLearner.train_step`` and ``end_to_end``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from trgl_dist.config import Config
from trgl_dist.method import local_loss
from trgl_dist.network.models import InputSpec
from trgl_dist.network.modules import LocalModule
from trgl_dist.training.build import modules_for
from trgl_dist.training.learner import (
    LossFn,
    ModuleLearner,
    Trainer,
    build_learners,
    chain,
    end_to_end,
)
from trgl_dist.training.memory import MIB

#: Report keys for MemTracker's categories. TEMP is the backward pass's scratch (mostly the
#: gradients of activations); OTH holds what we register ourselves: the pipeline batch buffers.
CATEGORIES = {
    _MemRefType.PARAM: "params",
    _MemRefType.GRAD: "grads",
    _MemRefType.OPT: "optimizer",
    _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "temp",
    _MemRefType.BUFFER: "bn_buffers",
    _MemRefType.OTH: "batch_buffers",
}
Step = Callable[[], None]


@dataclass(frozen=True)
class Network:
    """The modules with their learners (and optimizers), built by trgl_dist itself, and the
    mode they were built in (fake tensors; a null context for real ones)."""

    config: Config
    spec: InputSpec
    learners: list[ModuleLearner]
    mode: AbstractContextManager[object]

    @property
    def modules(self) -> list[LocalModule]:
        return [learner.module for learner in self.learners]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Each optimizer once: E2E's learners share one."""
        return list({id(lr.optimizer): lr.optimizer for lr in self.learners}.values())

    def trainer(self) -> Trainer:
        """One training batch of the config's regime: back-propagation through every module
        (``end_to_end``) for e2e, else each module's ``train_step`` in turn (``chain``)."""
        if self.config.train.regime == "e2e":
            return end_to_end(self.learners)
        return chain(self.learners)


def build_in(
    mode: AbstractContextManager[object],
    config: Config,
    spec: InputSpec,
    counts: Sequence[int],
    loss: LossFn = local_loss,
) -> Network:
    """The K modules and learners of ``config`` with ``counts`` blocks each, built in ``mode``
    (E2E's learners share one optimizer), every learner training with the local loss ``loss``."""
    with mode:
        learners = build_learners(config, modules_for(config.model, spec, counts))
    for learner in learners:
        learner.loss_fn = loss
    return Network(config, spec, learners, mode)


def build_fake(
    config: Config, spec: InputSpec, counts: Sequence[int], loss: LossFn = local_loss
) -> Network:
    """``build_in`` as fake tensors: real shapes and dtypes, no storage, no compute."""
    return build_in(FakeTensorMode(), config, spec, counts, loss)


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


def input_shape(net: Network, stage: int) -> tuple[int, ...]:
    """One sample's input shape of module ``stage`` (the data for module 0)."""
    s = net.spec
    if stage == 0:
        return (s.channels, s.size, s.size)
    return output_shape(net, stage - 1)


def output_shape(net: Network, stage: int) -> tuple[int, ...]:
    """One sample's output shape of module ``stage``, by a fake forward (no compute)."""
    s = net.spec
    with net.mode, torch.no_grad():
        h = torch.empty(1, s.channels, s.size, s.size)
        for mod in net.modules[: stage + 1]:
            mod.eval()
            h, _ = mod.features(h)
    return tuple(h.shape[1:])


def peak_of(net: Network, step: Step, tracked: Sequence[object]) -> dict[str, float]:
    """Peak bytes (MiB) of the second call of ``step``, by category, at the moment of the peak.

    The first call, untracked, creates the gradients and the optimizer state (momentum
    exists only after the first ``step()``); the second is the steady state.
    """
    with net.mode:
        step()
        tracker = MemTracker()
        tracker.track_external(*tracked)
        with tracker:
            step()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    out = {name: peak.get(kind, 0) / MIB for kind, name in CATEGORIES.items()}
    out["total"] = peak["Total"] / MIB
    return out
