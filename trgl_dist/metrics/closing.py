"""The end of a run, whoever ends it: summary.json, report.md and the console table."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from trgl_dist.errors import StorageError
from trgl_dist.metrics.failure import Failure
from trgl_dist.metrics.records import read_records
from trgl_dist.metrics.report import format_console_report, write_report
from trgl_dist.metrics.summary import summarize, write_summary
from trgl_dist.rundir import METRICS_FILE

logger = logging.getLogger(__name__)


def close_run(
    run_dir: Path,
    *,
    regime: str,
    num_modules: int,
    failure: Failure | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Summarize RUN_DIR/metrics.jsonl into summary.json and the report; print the results
    table (or the failure, on stderr). Returns the summary."""
    records = read_records(Path(run_dir) / METRICS_FILE)
    summary = summarize(
        records, regime=regime, num_modules=num_modules, failure=failure, extra=extra
    )
    try:
        write_summary(run_dir, summary)
        write_report(run_dir, records, summary)
    except (StorageError, OSError) as err:  # a full disk: keep the run's outcome
        if failure is None:  # else the failure's line says what matters
            sys.stderr.write(f"trgl_dist: {err}\n")
        logger.debug("run directory not written: %s", err)
    except Exception:  # a plotting problem must not turn a finished run into a failed one
        logger.exception("could not write the report")
    if failure is not None:
        sys.stderr.write(f"trgl_dist: training failed: {failure.description}\n")
        sys.stderr.flush()
    else:
        sys.stdout.write(format_console_report(summary) + "\n")
        sys.stdout.flush()
    return summary
