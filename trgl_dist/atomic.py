"""Files written whole or not at all: a reader (or a resumed run) never sees half of one."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from trgl_dist.errors import StorageError

#: Less room than this after a failed write means the disk is full.
FULL_BELOW_BYTES = 1 << 20


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through a temporary file in the same directory, then rename it: a
    reader sees the old file or the new one, never half of one. On any failure the
    temporary file is removed and the old file is left as it was; an OSError (a full or
    read-only disk) becomes a StorageError naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise StorageError(path, err) from None
    except RuntimeError:
        # torch.save's zip writer reports a short write as a RuntimeError ("unexpected pos")
        if _nearly_full(path.parent):
            raise StorageError(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def _nearly_full(directory: Path) -> bool:
    """Whether the file system of ``directory`` has (almost) no room left."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < FULL_BELOW_BYTES
