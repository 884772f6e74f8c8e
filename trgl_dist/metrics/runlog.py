"""The run's record log: every record appended to metrics.jsonl, and its scalars to TensorBoard."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import TracebackType

from trgl_dist.errors import StorageError
from trgl_dist.metrics.records import Record, encode
from trgl_dist.metrics.tensorboard import TensorBoardScalars, open_tensorboard
from trgl_dist.rundir import METRICS_FILE, TENSORBOARD_DIR


class RunLog:
    """Writes records to RUN_DIR/metrics.jsonl (one JSON object a line) and RUN_DIR/tb/."""

    def __init__(self, run_dir: Path, *, append: bool = False, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._file = open(self.metrics_path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
        self._scalars: TensorBoardScalars | None = None
        if tensorboard:
            self._scalars = open_tensorboard(self.run_dir / TENSORBOARD_DIR, append=append)

    def record(self, rec: Record) -> None:
        """Append one record and flush, so a crash loses at most the record being written.
        A full disk is a StorageError naming metrics.jsonl."""
        try:
            self._file.write(encode(rec) + "\n")
            self._file.flush()
            if self._scalars is not None:
                self._scalars.add(rec)
        except OSError as err:
            raise StorageError(self.metrics_path, err) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):  # what could not be written was already reported
            if not self._file.closed:
                self._file.close()
            if self._scalars is not None:
                self._scalars.close()
        self._scalars = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
