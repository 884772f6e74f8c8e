"""Command-line flags: one flag per config field, generated from the dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from trgl_dist import config as cfg

# The flags of DESIGN.md section 4 come first in --help; the others follow per section.
HELP = {
    "model": "architecture: resnet-small, resnet110, resnet50/101/152, vgg19, km-resnet, swin-tiny",
    "modules": "number of modules K",
    "split": "how blocks are divided into modules: " + ", ".join(cfg.SPLITS),
    "split-counts": "explicit block counts per module, e.g. 14,14,13,13",
    "method": "local objective: vanilla (VanGL), trgl, multipliers",
    "tau": "TRGL tau (transport weight is 1/(2 tau))",
    "tau-schedule": "midpoint-double (tau/2 then tau), constant, list (--tau-values)",
    "transport-norm": "mean (authors' code) or sum (per-sample squared norm)",
    "regime": "e2e, parallel, sequential, multilap (one process) or pipeline (torchrun)",
    "dataset": ", ".join(cfg.DATASETS),
    "data-dir": "dataset root (default: ~/.cache/trgl_dist/data)",
    "train-size": "seeded class-balanced subset of the training set (0: all)",
    "val-size": "hold out N training samples and score on them instead of the test set",
    "epochs": "epochs (0: one, or as many as --max-steps takes; per module for sequential)",
    "max-steps": "stop after N optimizer steps per module (0: no limit)",
    "lr": "learning rate (0: the paper's default for the regime; 0.05 for resnet-small)",
    "buffer-size": "pipeline inbox/outbox capacity in batches",
    "buffer-policy": "fifo (exact, backpressure) or replay (DGL asynchronous buffer)",
    "out": "run directory (default: runs/<regime>-<time>)",
    "checkpoint-every": "also checkpoint every N steps (0: only at each epoch end)",
    "keep-checkpoints": "keep the last N complete checkpoints (0: all)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise cfg.ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m trgl_dist.train",
        description="Module-wise training with transport regularization (TRGL).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, help="TOML file with the same keys as the flags")
    parser.add_argument(
        "--resume", type=Path, help="continue RUN_DIR from its last complete checkpoint"
    )
    for section, kind in cfg.SECTION_TYPES.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(kind):
            name = cfg.flag_name(section, f.name)
            group.add_argument(
                f"--{name}",
                dest=f"{section}.{f.name}",
                metavar=f.name.upper(),
                help=HELP.get(name, f"{section}.{f.name}"),
            )
    return parser


def parse(argv: Sequence[str] | None = None) -> tuple[cfg.Config, argparse.Namespace]:
    """defaults < --config FILE (or the resumed run's config.toml) < flags."""
    args = build_parser().parse_args(argv)
    flags: dict[str, dict[str, Any]] = {}
    extras = argparse.Namespace(config=None, resume=None)
    for dest, value in vars(args).items():
        if dest in ("config", "resume"):
            setattr(extras, dest, value)
            continue
        section, key = dest.split(".", 1)
        flags.setdefault(section, {})[key] = value
    base = cfg.Config()
    if extras.resume is not None:
        saved = Path(extras.resume) / "config.toml"
        if not saved.is_file():
            raise cfg.ConfigError(
                f"--resume {extras.resume}: no config.toml there (not a run directory)"
            )
        base = cfg.load_toml(saved)
    if extras.config is not None:
        base = cfg.load_toml(extras.config, base)
    config = cfg.from_mapping(flags, base)
    if extras.resume is not None:  # a resumed run stays in its own directory
        config = config.replace("train", out=str(extras.resume))
    return cfg.validate(config), extras
