"""Peak training memory by category, from MemTracker under fake tensors (no compute, no RAM)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from trgl_dist.config import Config
from trgl_dist.method import local_loss
from trgl_dist.network.models import InputSpec, build_backbone
from trgl_dist.network.modules import LocalModule, build_modules
from trgl_dist.training.learner import ModuleLearner, build_optimizer, taus

MIB = 2**20
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
LossFn = Callable[..., Any]


@dataclass(frozen=True)
class Network:
    """Fake-tensor modules with their learners (and optimizers), built by trgl_dist itself."""

    config: Config
    spec: InputSpec
    learners: list[ModuleLearner]
    fake: FakeTensorMode
    loss: LossFn = field(default=local_loss)  # the local objective: the package's by default

    @property
    def modules(self) -> list[LocalModule]:
        return [learner.module for learner in self.learners]


def build_fake(
    config: Config, spec: InputSpec, counts: Sequence[int], loss: LossFn = local_loss
) -> Network:
    """The K modules and learners of ``config`` with ``counts`` blocks each, as fake tensors."""
    fake = FakeTensorMode()
    m = config.model
    with fake:
        backbone = build_backbone(
            m.name,
            spec,
            num_modules=m.modules,
            width=m.width,
            blocks_per_module=m.blocks_per_module,
        )
        modules = build_modules(backbone, counts, spec, head=m.head)
        tau = taus(config, len(modules))
        learners = [ModuleLearner(k, mod, config, tau[k]) for k, mod in enumerate(modules)]
    return Network(config, spec, learners, fake, loss)


def local_step(
    learner: ModuleLearner, x: Tensor, y: Tensor, loss_fn: LossFn = local_loss
) -> Tensor:
    """``ModuleLearner.train_step`` without what reads values (the finiteness check, the
    meter): the same tensors are alive at the same moments, ``out`` until the return."""
    learner.module.train()
    out = learner.module(x.detach())
    loss = loss_fn(
        out.logits,
        y,
        out.residues,
        method=learner.method.name,
        tau=learner.tau,
        transport_norm=learner.method.transport_norm,
        label_smoothing=learner.method.label_smoothing,
    )
    learner.optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    learner.optimizer.step()
    return out.h.detach()


def lockstep_step(net: Network, batch_size: int) -> Step:
    """One batch of the `parallel` regime: module k+1 trains on k's detached output while
    the loop still holds the data batch and that output (as ``regimes/parallel.py``)."""
    s = net.spec

    def run() -> None:
        x = torch.randn(batch_size, s.channels, s.size, s.size)
        y = torch.randint(0, s.num_classes, (batch_size,))
        h = x
        for learner in net.learners:
            h = local_step(learner, h, y, net.loss)

    return run


def e2e_parts(net: Network) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    """As ``regimes/e2e.py``: one optimizer over every body and the last head."""
    params = [p for mod in net.modules for p in mod.body.parameters()]
    params += list(net.modules[-1].head.parameters())
    return params, build_optimizer(params, net.config)


def e2e_step(net: Network, batch_size: int, optimizer: torch.optim.Optimizer) -> Step:
    """One batch of back-propagation through the whole network (plain CE, as e2e.py)."""
    s = net.spec

    def run() -> None:
        x = torch.randn(batch_size, s.channels, s.size, s.size)
        y = torch.randint(0, s.num_classes, (batch_size,))
        h, residues = x, []
        for mod in net.modules:
            mod.train()
            h, block_residues = mod.features(h)
            residues += block_residues
        logits = net.modules[-1].head(h)
        loss = local_loss(
            logits, y, residues, method="vanilla", label_smoothing=net.config.method.label_smoothing
        )
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()

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
        local_step(learner, x, y, net.loss)

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
    with net.fake:
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
    with net.fake, torch.no_grad():
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
    with net.fake:
        step()
        tracker = MemTracker()
        tracker.track_external(*tracked)
        with tracker:
            step()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    out = {name: peak.get(kind, 0) / MIB for kind, name in CATEGORIES.items()}
    out["total"] = peak["Total"] / MIB
    return out
