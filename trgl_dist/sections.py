"""What every config section is made of: fields that carry their own help text."""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any, help: str) -> Any:
    """A config field with its help text: one sentence with the unit, shown by --help."""
    return dataclasses.field(default=default, metadata={"help": help})


def help_of(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("help", ""))
