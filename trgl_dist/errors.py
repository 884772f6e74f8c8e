"""The errors a user sees as one line, and how an exception becomes that line (no torch here)."""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix; its message is shown as one line, with exit code 2."""


class ConfigError(UserError, ValueError):
    """A bad key or value; the message names the key."""


class DataError(UserError, RuntimeError):
    """The dataset cannot be had or read; the message says how to get it."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


class CoordinatorError(UserError, RuntimeError):
    """The metrics coordinator could not start (e.g. its port is taken)."""


class StorageError(RuntimeError):
    """A file of the run could not be written (disk full, read-only, gone); the message
    names the path and the OS error."""

    def __init__(self, path: object, err: OSError) -> None:
        super().__init__(f"cannot write {path}: {err.strerror or err}")
        self.path = path


def user_message(err: BaseException) -> str:
    """What to show of a UserError: its message, even when a DataLoader worker raised it
    (the loader re-raises it with the worker's traceback glued in front of the message)."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    name = type(err).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name.

    torch's load errors open with a header ("Error(s) in loading state_dict ..."), so a
    header line ending with a colon is skipped for the line that says what went wrong.
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[1]
    return lines[0]
