"""The run directory's record log: metrics.jsonl, TensorBoard scalars and summary.json."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from trgl_dist.checkpoints.manifest import complete_steps

if TYPE_CHECKING:
    from trgl_dist.config import Config

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tb"

# Identity fields of a record: they say where a value comes from, they are not values.
_NOT_SCALARS = frozenset({"kind", "step", "epoch", "module", "stage", "modules", "rank", "peer"})


def _json_scalar(obj: Any) -> Any:
    """Let numpy and torch scalars/arrays into JSON without importing either."""
    if callable(getattr(obj, "item", None)) and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    if callable(getattr(obj, "tolist", None)):
        return obj.tolist()
    raise TypeError(f"a metrics record field of type {type(obj).__name__} is not JSON")


def encode_record(rec: dict[str, Any]) -> str:
    """One record as one JSON line (no newline); NaN/inf kept so divergence stays visible."""
    return json.dumps(rec, default=_json_scalar)


def _scalar_tags(rec: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """TensorBoard (tag, value) pairs of a record; modules are named 1-based for humans."""
    kind = rec.get("kind")
    if kind in ("train", "eval") and isinstance(rec.get("module"), int):
        prefix = f"module{rec['module'] + 1}/{kind}_"
    elif kind == "stage" and isinstance(rec.get("stage"), int):
        prefix = f"stage{rec['stage']}/"
    elif kind == "epoch":
        prefix = "epoch/"
    else:
        return
    for key, value in rec.items():
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if is_number and key not in _NOT_SCALARS:
            yield prefix + key, float(value)


class _TensorBoardScalars:
    """Scalar events through tensorboard's own writer, so the coordinator need not import torch."""

    def __init__(self, log_dir: Path) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event = event_pb2.Event
        self._summary = summary_pb2.Summary
        self._writer = EventFileWriter(str(log_dir), flush_secs=10)

    def add(self, rec: dict[str, Any]) -> None:
        values = [self._summary.Value(tag=t, simple_value=v) for t, v in _scalar_tags(rec)]
        if values:
            step = rec.get("step")
            summary = self._summary(value=values)
            event = self._event(wall_time=time.time(), step=int(step or 0), summary=summary)
            self._writer.add_event(event)

    def close(self) -> None:
        self._writer.close()


def _open_tensorboard(log_dir: Path, *, append: bool) -> _TensorBoardScalars | None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        logger.info("tensorboard is not installed: no TensorBoard events in %s", log_dir)
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    if not append:
        # A fresh metrics.jsonl with old event files beside it would mix two runs' curves.
        for old in log_dir.glob("events.out.tfevents.*"):
            old.unlink()
    return _TensorBoardScalars(log_dir)


class RunLog:
    """Writes records to RUN_DIR/metrics.jsonl (one JSON object a line) and RUN_DIR/tb/."""

    def __init__(self, run_dir: Path, *, append: bool = False, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._file = open(self.metrics_path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
        log_dir = self.run_dir / TENSORBOARD_DIR
        self._scalars = _open_tensorboard(log_dir, append=append) if tensorboard else None

    def record(self, rec: dict[str, Any]) -> None:
        """Append one record and flush, so a crash loses at most the record being written."""
        self._file.write(encode_record(rec) + "\n")
        self._file.flush()
        if self._scalars is not None:
            self._scalars.add(rec)

    def close(self) -> None:
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


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl; an unreadable line (a crash mid-write) is skipped."""
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                logger.warning("skipping unreadable line %d of %s", number, path)
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def _of_kind(records: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == kind]


def _module_summaries(records: Sequence[dict[str, Any]], num_modules: int) -> list[dict[str, Any]]:
    accuracies: dict[int, list[float]] = {k: [] for k in range(num_modules)}
    for rec in _of_kind(records, "eval"):
        if rec.get("module") in accuracies and rec.get("accuracy") is not None:
            accuracies[rec["module"]].append(rec["accuracy"])
    return [
        {
            "module": k,
            "test_accuracy": accs[-1] if accs else None,
            "best_test_accuracy": max(accs) if accs else None,
        }
        for k, accs in accuracies.items()
    ]


def _stage_summaries(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    last_end = {r["stage"]: r for r in _of_kind(records, "end") if isinstance(r.get("stage"), int)}
    stages = []
    for stage, end in sorted(last_end.items()):
        busy, wait_in, wait_out = (end.get(k) or 0.0 for k in ("busy_s", "wait_in_s", "wait_out_s"))
        total = busy + wait_in + wait_out or 1.0  # all zero: every share is 0, not a 0/0
        stages.append(
            {
                "stage": stage,
                "modules": end.get("modules", []),
                "busy": busy / total,
                "wait": (wait_in + wait_out) / total,
                "wait_in": wait_in / total,
                "wait_out": wait_out / total,
                "samples_per_s": end.get("samples_per_s"),
                "peak_rss_mb": end.get("peak_rss_mb"),
                "peak_tensor_mb": end.get("peak_tensor_mb"),
                "bytes_sent": end.get("bytes_sent"),
                "staleness_mean": end.get("staleness_mean"),
            }
        )
    return stages


def _epoch_times(records: Sequence[dict[str, Any]]) -> list[float]:
    # Last record wins per epoch: a resumed run may repeat the epoch it was stopped in.
    seconds = {r["epoch"]: r["seconds"] for r in _of_kind(records, "epoch")}
    return [seconds[epoch] for epoch in sorted(seconds)]


def _overall_samples_per_s(
    records: Sequence[dict[str, Any]], stages: list[dict[str, Any]], epoch_times: list[float]
) -> float | None:
    """Pipeline: its slowest stage. One process: data samples per second of epoch time."""
    stage_rates = [s["samples_per_s"] for s in stages if s["samples_per_s"] is not None]
    if stage_rates:
        return float(min(stage_rates))
    # Per epoch, the module that trained most saw the data pass (sequential trains one at a time).
    per_epoch_module: Counter[tuple[Any, Any]] = Counter()
    for rec in _of_kind(records, "train"):
        per_epoch_module[(rec.get("epoch"), rec.get("module"))] += rec.get("samples") or 0
    per_epoch: dict[Any, float] = {}
    for (epoch, _module), samples in per_epoch_module.items():
        per_epoch[epoch] = max(per_epoch.get(epoch, 0), samples)
    total_seconds = sum(epoch_times)
    if total_seconds <= 0 or not per_epoch:
        return None
    return sum(per_epoch.values()) / total_seconds


def _reporter(rec: dict[str, Any]) -> Any:
    """The rank that wrote an error/end record (rank r runs stage r)."""
    return rec.get("rank", rec.get("stage"))


def failure_info(
    stage: Any, rank: Any, cause: str, description: str, message: str | None = None
) -> dict[str, Any]:
    """The "failure" entry of summary.json; ``description`` is the one line shown to people."""
    return {
        "stage": stage,
        "rank": rank,
        "cause": cause,
        "message": description if message is None else message,
        "description": description,
    }


def diagnose_failure(
    records: Sequence[dict[str, Any]], world_size: int | None = None
) -> dict[str, Any] | None:
    """The root cause among error records, or None when there is none.

    A raised exception is the cause. Otherwise the rank that died is one that never
    reported (neither error nor end): first one named in "peer-lost" reports, else, when
    ``world_size`` is known, any silent rank. Stages stopped by a signal ("interrupted",
    e.g. the launcher's SIGTERM after another rank died) are never the cause if another is found.
    """
    errors = _of_kind(records, "error")
    if not errors:
        return None
    for err in errors:
        if err.get("cause") == "exception":
            stage, rank, message = err.get("stage"), _reporter(err), str(err.get("message", ""))
            description = f"stage {stage} (rank {rank}) raised: {message}"
            return failure_info(stage, rank, "exception", description, message)
    reported = {_reporter(r) for r in records if r.get("kind") in ("error", "end")}
    silent = Counter(
        e["peer"]
        for e in errors
        if e.get("cause") == "peer-lost" and e.get("peer") is not None and e["peer"] not in reported
    )
    if not silent and world_size is not None:
        silent.update(rank for rank in range(world_size) if rank not in reported)
    if silent:
        dead = silent.most_common(1)[0][0]
        description = f"stage {dead} (rank {dead}) died without reporting (killed?)"
        failure = failure_info(dead, dead, "died", description)
        failure["reported_by"] = sorted(_reporter(e) for e in errors)
        return failure
    first = next((e for e in errors if e.get("cause") != "interrupted"), errors[0])
    stage, rank, cause = first.get("stage"), _reporter(first), str(first.get("cause"))
    message = str(first.get("message", ""))
    description = f"stage {stage} (rank {rank}) {cause}: {message}"
    return failure_info(stage, rank, cause, description, message)


def summarize(
    records: Sequence[dict[str, Any]],
    *,
    regime: str,
    num_modules: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of summary.json; keys of ``extra`` are added last and win."""
    modules = _module_summaries(records, num_modules)
    finals = [(m["test_accuracy"], m["module"]) for m in modules if m["test_accuracy"] is not None]
    # max() keeps the first of equals: on a tie the shallower, cheaper module wins.
    best = max(finals, key=lambda pair: pair[0]) if finals else (None, None)
    stages = _stage_summaries(records)
    epoch_times = _epoch_times(records)
    summary: dict[str, Any] = {
        "regime": regime,
        "num_modules": num_modules,
        "modules": modules,
        "last_module_accuracy": modules[-1]["test_accuracy"] if modules else None,
        "best_module": best[1],
        "best_module_accuracy": best[0],
        "epoch_times": epoch_times,
        "samples_per_s": _overall_samples_per_s(records, stages, epoch_times),
        "stages": stages,
        "failure": diagnose_failure(records),
    }
    summary.update(extra or {})
    return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write summary.json atomically: readers see the old file or the new one, never half."""
    path = Path(run_dir) / SUMMARY_FILE
    tmp = path.with_name(f".{SUMMARY_FILE}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(json.dumps(summary, indent=2, default=_json_scalar) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_directory(config: Config, resume: bool = False) -> Path:
    """The run directory, created; the default name holds the regime and the start time.
    A directory that already holds checkpoints is only reused by --resume."""
    from trgl_dist.config import ConfigError  # here: the coordinator must not import torch

    out = config.train.out or f"runs/{config.train.regime}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(out)
    if not resume and complete_steps(path):
        raise ConfigError(
            f"train.out: {path} already holds a run with checkpoints: "
            f"continue it with --resume {path}, or choose another --out"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"train.out: cannot create run directory {path}: {err.strerror}"
        ) from None
    return path
