"""From a config to the list of modules: backbone, split, heads, and the checks on them."""

from __future__ import annotations

import torch

from trgl_dist.config import Config, ConfigError
from trgl_dist.network.models import Backbone, InputSpec, build_backbone
from trgl_dist.network.modules import LocalModule, build_modules
from trgl_dist.network.split import split_blocks


def build_network(config: Config, spec: InputSpec) -> tuple[list[LocalModule], list[int]]:
    """All K modules, built identically on every process (same seed gives same weights).

    Impossible requests (K larger than the number of blocks, TRGL on a model without
    residual blocks, ...) raise ConfigError naming the problem.
    """
    m = config.model
    try:
        backbone = build_backbone(
            m.name,
            spec,
            num_modules=m.modules,
            width=m.width,
            blocks_per_module=m.blocks_per_module,
        )
    except ValueError as err:
        raise ConfigError(f"model.name: {err}") from None
    _check_transport(config, backbone)
    try:
        counts = split_blocks(
            m.split,
            backbone,
            spec,
            m.modules,
            m.split_counts,
            batch_size=config.data.batch_size,
            head=m.head,
        )
    except ValueError as err:
        raise ConfigError(f"model.split: {err}") from None
    return build_modules(backbone, counts, spec, head=m.head), counts


def resolve_split(config: Config, spec: InputSpec) -> Config:
    """An equal-time split is measured, so it can differ from one process or run to the next:
    measure it once and make it explicit (``split_counts``), so that every rank, the written
    config.toml and a resumed run all use the same counts."""
    m = config.model
    if m.split != "equal-time" or m.split_counts:
        return config
    with torch.random.fork_rng(devices=[]):  # the weights drawn afterwards stay the same
        backbone = build_backbone(
            m.name,
            spec,
            num_modules=m.modules,
            width=m.width,
            blocks_per_module=m.blocks_per_module,
        )
        try:
            counts = split_blocks(
                "equal-time",
                backbone,
                spec,
                m.modules,
                batch_size=config.data.batch_size,
                head=m.head,
            )
        except ValueError as err:
            raise ConfigError(f"model.split: {err}") from None
    return config.replace("model", split_counts=tuple(counts))


def _check_transport(config: Config, backbone: Backbone) -> None:
    if config.method.name == "vanilla":
        return
    if not any(block.has_residue for block in backbone.blocks):
        raise ConfigError(
            f"method.name: {config.method.name} needs residual blocks and "
            f"{config.model.name} has none (use --method vanilla)"
        )
