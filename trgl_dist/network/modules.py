"""Local modules T_k with their auxiliary heads F_k, and the cut network G_k then F_k."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from trgl_dist.network.heads import build_head
from trgl_dist.network.models import Backbone, Block, InputSpec

#: The dummy batch that infers each module's output shape (2: BatchNorm needs > 1 value).
SHAPE_PROBE_BATCH = 2


@dataclass
class ModuleOutput:
    """What one module computes on a batch."""

    h: Tensor  # the module's output, the next module's input
    logits: Tensor  # its auxiliary head's prediction, (B, num_classes)
    residues: list[Tensor]  # every residue of its blocks, in order


class LocalModule(nn.Module):
    """Consecutive blocks (the stem first, for module 1 only) and their classifier head."""

    def __init__(self, body: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.body = nn.ModuleList(body)
        self.head = head

    def features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The body alone: (h, residues)."""
        residues: list[Tensor] = []
        for layer in self.body:
            if isinstance(layer, Block):
                x, layer_residues = layer(x)
                residues.extend(layer_residues)
            else:  # the stem: a plain tensor-to-tensor module
                x = layer(x)
        return x, residues

    def forward(self, x: Tensor) -> ModuleOutput:
        h, residues = self.features(x)
        return ModuleOutput(h=h, logits=self.head(h), residues=residues)


def init_weights(module: nn.Module, gain: float = 0.1) -> None:
    """The paper's init: orthogonal (gain 0.1) Conv/Linear weights, zero biases,
    BatchNorm weight 1 and bias 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            nn.init.orthogonal_(layer.weight, gain=gain)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def check_counts(counts: Sequence[int], num_blocks: int) -> None:
    if not counts or any(c < 1 for c in counts) or sum(counts) != num_blocks:
        raise ValueError(
            f"block counts {list(counts)} must be >= 1 each and sum to {num_blocks} blocks"
        )


@torch.no_grad()
def output_shape(body: Sequence[nn.Module], in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """One sample's output shape of ``body``, by a dummy forward in eval mode."""
    probe = LocalModule(body, nn.Identity())
    was_training = [layer.training for layer in body]
    probe.eval()  # no running-statistics update from the dummy batch
    h, _ = probe.features(torch.zeros(SHAPE_PROBE_BATCH, *in_shape))
    for layer, mode in zip(body, was_training):
        layer.train(mode)
    return tuple(h.shape[1:])


def build_modules(
    backbone: Backbone, counts: Sequence[int], spec: InputSpec, head: str = "1cnn"
) -> list[LocalModule]:
    """Cut ``backbone`` into modules of ``counts`` blocks, each with a ``head`` classifier."""
    check_counts(counts, len(backbone.blocks))
    modules: list[LocalModule] = []
    shape: tuple[int, ...] = (spec.channels, spec.size, spec.size)
    start = 0
    for index, count in enumerate(counts):
        body: list[nn.Module] = [backbone.stem] if index == 0 else []
        body.extend(backbone.blocks[start : start + count])
        start += count
        shape = output_shape(body, shape)
        local = LocalModule(body, build_head(head, shape, spec.num_classes, backbone.layout))
        if backbone.init:
            init_weights(local)
        modules.append(local)
    return modules


class CutModel(nn.Module):
    """G_k then F_k: the bodies of the given modules, then the last one's head."""

    def __init__(self, modules: Sequence[LocalModule]) -> None:
        super().__init__()
        if not modules:
            raise ValueError("a cut model needs at least one module")
        self.stages = nn.ModuleList(modules)

    def forward(self, x: Tensor) -> Tensor:
        stages = [cast(LocalModule, local) for local in self.stages]
        for local in stages:
            x, _ = local.features(x)
        return stages[-1].head(x)
