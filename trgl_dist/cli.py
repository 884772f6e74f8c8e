"""Command-line flags: one flag per config field, its help text taken from the field."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from trgl_dist import config as cfg
from trgl_dist.errors import ConfigError
from trgl_dist.rundir import CONFIG_FILE
from trgl_dist.sections import help_of
from trgl_dist.validate import validate


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are ConfigErrors: one line and exit code 2, not usage."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def command_parser(command: str, description: str) -> OneLineParser:
    """The parser of ``python -m trgl_dist.COMMAND``, its description shown as written."""
    return OneLineParser(
        prog=f"python -m trgl_dist.{command}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser(
    command: str = "train",
    description: str = "Module-wise training with transport regularization (TRGL).",
) -> argparse.ArgumentParser:
    """Every config field as a flag, for ``python -m trgl_dist.COMMAND``; a command adds
    flags of its own (without a dot in their ``dest``)."""
    parser = OneLineParser(
        prog=f"python -m trgl_dist.{command}",
        description=description,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config", type=Path, help="TOML file with the flags' keys, one table per section."
    )
    parser.add_argument(
        "--resume", type=Path, help="Continue RUN_DIR from its last complete checkpoint."
    )
    parser.add_argument(
        "--resume-step",
        type=int,
        help="With --resume: continue from the complete checkpoint of this step instead.",
    )
    for section, kind in cfg.SECTION_TYPES.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(kind):
            default = f.default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            # A switch: the flag alone turns it on; "--flag false" still turns it off.
            switch: dict[str, Any] = {}
            if isinstance(default, bool):
                switch = {"nargs": "?", "const": "true"}
            group.add_argument(
                f"--{cfg.flag_name(section, f.name)}",
                dest=f"{section}.{f.name}",
                metavar=f.name.upper(),
                help=f"{help_of(f)} (default: {shown!r})".replace("%", "%%"),
                **switch,
            )
    return parser


def parse(
    argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> tuple[cfg.Config, argparse.Namespace]:
    """defaults < --config FILE (or the resumed run's config.toml) < flags. The command's
    own flags come back in the namespace, beside config, resume and resume_step."""
    args = (parser or build_parser()).parse_args(argv)
    flags: dict[str, dict[str, Any]] = {}
    extras = argparse.Namespace(config=None, resume=None, resume_step=None)
    for dest, value in vars(args).items():
        if "." not in dest:
            setattr(extras, dest, value)
            continue
        section, key = dest.split(".", 1)
        flags.setdefault(section, {})[key] = value
    base = cfg.Config()
    if extras.resume_step is not None and extras.resume is None:
        raise ConfigError("--resume-step needs --resume RUN_DIR")
    if extras.resume is not None:
        saved = Path(extras.resume) / CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(
                f"--resume {extras.resume}: no config.toml there (not a run directory)"
            )
        base = cfg.load_toml(saved)
    if extras.config is not None:
        base = cfg.load_toml(extras.config, base)
    config = cfg.from_mapping(flags, base)
    if extras.resume is not None:  # a resumed run stays in its own directory
        config = config.replace("train", out=str(extras.resume))
    return validate(config), extras
