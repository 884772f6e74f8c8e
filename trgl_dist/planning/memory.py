"""Peak training memory by category, from MemTracker under fake tensors: real shapes and
dtypes, no storage and no compute, so a paper-scale network is measured on any machine.

The steps are the package's own (``ModuleLearner.train_step``); the planner reads each
module's resident state and the extra peak of its step from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
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


Tracked = torch.nn.Module | torch.optim.Optimizer | torch.Tensor


def peak_of(net: Network, step: Step, tracked: Sequence[Tracked]) -> dict[str, float]:
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


#: Resident categories: held for the whole run, whatever step is running.
RESIDENT = ("params", "grads", "optimizer", "bn_buffers")


@dataclass(frozen=True)
class ModuleMemory:
    """One module's memory in training (MiB): what stays resident, the extra peak of its
    step, its gradients, and one batch of its output with labels and sample ids."""

    state_mib: float
    step_mib: float
    grad_mib: float
    out_mib: float


def module_memory(
    config: Config, spec: InputSpec, counts: Sequence[int], batch_size: int
) -> list[ModuleMemory]:
    """Each module's memory in a steady-state training step of ``batch_size``, measured
    alone on its input's shape (fake tensors)."""
    net = build_fake(config.replace("train", regime="parallel"), spec, counts)
    out: list[ModuleMemory] = []
    seen: dict[tuple[object, ...], ModuleMemory] = {}
    for k, learner in enumerate(net.learners):
        in_shape = input_shape(net, k)
        # Modules of one resolution with as many blocks are alike: measure one of them.
        params = sum(p.numel() for p in learner.module.parameters())
        alike = (in_shape, output_shape(net, k), counts[k], params)
        if alike in seen:
            out.append(seen[alike])
            continue

        def step(learner: ModuleLearner = learner, in_shape: tuple[int, ...] = in_shape) -> None:
            x = torch.randn(batch_size, *in_shape)
            y = torch.randint(0, spec.num_classes, (batch_size,))
            learner.train_step(x, y)

        peak = peak_of(net, step, [learner.module, learner.optimizer])
        state = sum(peak[name] for name in RESIDENT)
        grads = sum(p.numel() * p.element_size() for p in learner.module.parameters())
        out_elements = batch_size * _numel(output_shape(net, k))
        wire = out_elements * 4 + 2 * batch_size * 8  # float32 activations, int64 labels, ids
        seen[alike] = ModuleMemory(state, peak["total"] - state, grads / MIB, wire / MIB)
        out.append(seen[alike])
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
