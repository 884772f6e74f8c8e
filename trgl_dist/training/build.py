"""From the model config to the list of modules: backbone, split, heads, and their checks."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from trgl_dist.config import Config, ModelConfig
from trgl_dist.errors import ConfigError
from trgl_dist.network.models import Backbone, InputSpec, build_backbone
from trgl_dist.network.modules import LocalModule, build_modules
from trgl_dist.network.split import profile_times, split_blocks

CPU = torch.device("cpu")


def backbone_for(model: ModelConfig, spec: InputSpec) -> Backbone:
    """The backbone the model section names, for ``spec``; a bad name is a ConfigError."""
    try:
        return build_backbone(
            model.name,
            spec,
            num_modules=model.modules,
            width=model.width,
            blocks_per_module=model.blocks_per_module,
        )
    except ValueError as err:
        raise ConfigError(f"model.name: {err}") from None


def split_for(
    config: Config, backbone: Backbone, spec: InputSpec, device: torch.device = CPU
) -> list[int]:
    """Blocks per module: the explicit counts, or the configured split of ``backbone``
    (an equal-time split is profiled on ``device``)."""
    m = config.model
    try:
        return split_blocks(
            m.split,
            backbone,
            spec,
            m.modules,
            m.split_counts,
            batch_size=config.data.batch_size,
            head=m.head,
            profiler=functools.partial(profile_times, device=device),
        )
    except ValueError as err:
        raise ConfigError(f"model.split: {err}") from None


def modules_for(
    model: ModelConfig, spec: InputSpec, counts: Sequence[int]
) -> list[LocalModule]:
    """The modules of ``counts`` blocks each (no split measured): what a checkpoint holds."""
    try:
        return build_modules(backbone_for(model, spec), counts, spec, head=model.head)
    except ValueError as err:
        raise ConfigError(f"model.split_counts: {err}") from None


def build_network(config: Config, spec: InputSpec) -> tuple[list[LocalModule], list[int]]:
    """All K modules, built identically on every process (same seed gives same weights).

    Impossible requests (K larger than the number of blocks, TRGL on a model without
    residual blocks, ...) raise ConfigError naming the problem.
    """
    backbone = backbone_for(config.model, spec)
    _check_transport(config, backbone)
    counts = split_for(config, backbone, spec)
    return build_modules(backbone, counts, spec, head=config.model.head), counts


def resolve_split(config: Config, spec: InputSpec, device: torch.device = CPU) -> Config:
    """An equal-time split is measured, so it can differ from one process or run to the next:
    measure it once and make it explicit (``split_counts``), so that every rank, the written
    config.toml and a resumed run all use the same counts."""
    if config.model.split != "equal-time" or config.model.split_counts:
        return config
    with torch.random.fork_rng(devices=[]):  # the weights drawn afterwards stay the same
        counts = split_for(config, backbone_for(config.model, spec), spec, device)
    return config.replace("model", split_counts=tuple(counts))


def _check_transport(config: Config, backbone: Backbone) -> None:
    if config.method.name == "vanilla":
        return
    if not any(block.has_residue for block in backbone.blocks):
        raise ConfigError(
            f"method.name: {config.method.name} needs residual blocks and "
            f"{config.model.name} has none (use --method vanilla)"
        )
