"""The record schema: every line of metrics.jsonl, and every message a rank sends the coordinator.

One dataclass per kind. Writers build them, ``encode`` turns one into a JSON line, and
``decode`` turns a JSON object back into one, or raises ``RecordError`` naming the field:
the coordinator drops (and counts) what it cannot decode, so no reader ever sees a record
that does not fit the schema. No torch here: the coordinator imports this module.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

#: Written into every record as "v". A reader refuses another version.
RECORD_VERSION = 1
MAX_MESSAGE_CHARS = 4096
MAX_LIST_ITEMS = 4096
#: Largest integer accepted in any field (2**53: exact in every JSON reader).
MAX_INT = 2**53


class RecordError(ValueError):
    """A JSON object that is not a valid record; the message names the field."""


def _count(minimum: int = 0, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"min": minimum})


def _amount(*, maximum: float | None = None, default: Any = dataclasses.MISSING) -> Any:
    """A finite float field, >= 0 (and <= ``maximum``)."""
    return field(default=default, metadata={"min": 0.0, "max": maximum})


def _value() -> Any:
    """A float field of any sign that may be NaN or inf (a loss: divergence must show)."""
    return field(metadata={"finite": False})


def _optional(default: Any = None, **metadata: Any) -> Any:
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class Record:
    """Base of every record: the step and epoch it belongs to."""

    kind: ClassVar[str] = ""
    step: int = _count()
    epoch: int = _count()


@dataclass(frozen=True, kw_only=True)
class TrainRecord(Record):
    """A module's training statistics, means over the steps since its previous record."""

    kind: ClassVar[str] = "train"
    module: int = _count()
    stage: int = _count()
    loss: float = _value()
    ce: float = _value()
    transport: float = _value()
    accuracy: float = _amount(maximum=1.0)
    samples: int = _count()
    tau: float | None = _optional(min=0.0)
    lambda_: float | None = _optional(finite=False, json="lambda")


@dataclass(frozen=True, kw_only=True)
class EvalRecord(Record):
    """A module's score on the test (or validation) set after an epoch."""

    kind: ClassVar[str] = "eval"
    module: int = _count()
    stage: int = _count()
    accuracy: float = _amount(maximum=1.0)
    loss: float = _value()
    samples: int = _count(1)


@dataclass(frozen=True, kw_only=True)
class EpochRecord(Record):
    """An epoch's wall time, from stage 0 (the one that draws the data)."""

    kind: ClassVar[str] = "epoch"
    stage: int = _count()
    seconds: float = _amount()


@dataclass(frozen=True, kw_only=True)
class StageRecord(Record):
    """A stage's cumulative clock, throughput, buffers, transfers and memory."""

    kind: ClassVar[str] = "stage"
    stage: int = _count()
    rank: int = _count()
    replica: int = _count(default=0)
    modules: tuple[int, ...]
    busy_s: float = _amount()
    wait_in_s: float = _amount()
    wait_out_s: float = _amount()
    samples: int = _count()
    samples_per_s: float = _amount()
    inbox_depth: int = _count()
    bytes_sent: int = _count()
    batches_sent: int = _count(default=0)
    seconds_sending: float = _amount(default=0.0)
    batches_received: int = _count(default=0)
    bytes_received: int = _count(default=0)
    seconds_waiting_on_put: float = _amount(default=0.0)
    staleness_mean: float | None = _optional(min=0.0)
    peak_rss_mb: float = _amount()
    peak_tensor_mb: float = _amount()
    cuda_peak_mb: float | None = _optional(min=0.0)
    step_ms: float | None = _optional(min=0.0)  # mean compute of a training step, after warm-up
    step_peak_mb: float | None = _optional(min=0.0)  # one step's tensors, and queued batches


@dataclass(frozen=True, kw_only=True)
class EndRecord(StageRecord):
    """A stage's last record: it has passed END on; its totals are final."""

    kind: ClassVar[str] = "end"


#: Why a rank stopped, in an ErrorRecord.
CAUSES = ("exception", "peer-lost", "interrupted")


@dataclass(frozen=True, kw_only=True)
class ErrorRecord(Record):
    """A rank stopped early; ``peer`` is the rank it lost, for cause "peer-lost"."""

    kind: ClassVar[str] = "error"
    step: int = _count(-1)
    epoch: int = _count(-1)
    stage: int = _count()
    rank: int = _count()
    message: str = ""
    cause: str = _optional("exception", choices=CAUSES)
    peer: int | None = _optional(min=0)


@dataclass(frozen=True, kw_only=True)
class CheckpointRecord(Record):
    """A stage wrote the files of its modules for the checkpoint of ``step``."""

    kind: ClassVar[str] = "checkpoint"
    stage: int = _count()
    modules: tuple[int, ...] = ()


KINDS: dict[str, type[Record]] = {
    cls.kind: cls
    for cls in (
        TrainRecord,
        EvalRecord,
        EpochRecord,
        StageRecord,
        EndRecord,
        ErrorRecord,
        CheckpointRecord,
    )
}


def _json_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("json", f.name))


def to_dict(record: Record) -> dict[str, Any]:
    """The JSON object of ``record``: "v", "kind", then its fields."""
    out: dict[str, Any] = {"v": RECORD_VERSION, "kind": record.kind}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        out[_json_name(f)] = list(value) if isinstance(value, tuple) else value
    return out


def encode(record: Record) -> str:
    """One record as one JSON line (no newline); NaN and inf are kept (a diverged loss)."""
    return json.dumps(to_dict(record))


def decode(obj: Any, *, versionless: bool = False) -> Record:
    """The record of a decoded JSON object; raises RecordError unless it fits the schema.

    ``versionless`` accepts a record without "v" (a run log of an earlier release).
    """
    if not isinstance(obj, dict):
        raise RecordError(f"a record is a JSON object, got {type(obj).__name__}")
    version = obj.get("v", RECORD_VERSION if versionless else None)
    if version != RECORD_VERSION or isinstance(version, bool):
        raise RecordError(f"v: record version {version!r}, this version reads {RECORD_VERSION}")
    kind = obj.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RecordError(f"kind: unknown record kind {kind!r}")
    fields = dataclasses.fields(cls)
    names = {_json_name(f) for f in fields} | {"v", "kind"}
    unknown = sorted(set(obj) - names)
    if unknown:
        raise RecordError(f"{kind} record: unknown field {unknown[0]!r}")
    values = {}
    for f in fields:
        name = _json_name(f)
        if name in obj:
            values[f.name] = _check(f, name, obj[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"{kind} record: missing field {name!r}")
    return cls(**values)


def _check(f: dataclasses.Field[Any], name: str, value: Any) -> Any:
    """``value`` if it fits field ``f``'s type and range; else RecordError naming ``name``."""
    kind = str(f.type)
    optional = kind.endswith("| None")
    if value is None:
        if optional:
            return None
        raise RecordError(f"{name}: must not be null")
    if kind.startswith("int"):
        return _check_int(name, value, f.metadata)
    if kind.startswith("float"):
        return _check_float(name, value, f.metadata)
    if kind.startswith("str"):
        return _check_str(name, value, f.metadata)
    if kind.startswith("tuple"):
        if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS:
            raise RecordError(f"{name}: must be a list of at most {MAX_LIST_ITEMS} integers")
        return tuple(_check_int(name, item, {"min": 0}) for item in value)
    raise AssertionError(f"record field {name} has an unhandled type {kind}")


def _check_int(name: str, value: Any, metadata: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RecordError(f"{name}: must be an integer, got {type(value).__name__}")
    minimum = metadata.get("min", 0)
    if not minimum <= value <= MAX_INT:
        raise RecordError(f"{name}: {value} is out of range [{minimum}, 2**53]")
    return value


def _check_float(name: str, value: Any, metadata: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise RecordError(f"{name}: must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        if metadata.get("finite", True):
            raise RecordError(f"{name}: must be finite, got {value}")
        return value
    minimum, maximum = metadata.get("min"), metadata.get("max")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        raise RecordError(f"{name}: {value} is out of range [{minimum}, {maximum}]")
    return value


def _check_str(name: str, value: Any, metadata: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_MESSAGE_CHARS:
        raise RecordError(f"{name}: must be a string of at most {MAX_MESSAGE_CHARS} characters")
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise RecordError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


def read_records(path: Path) -> list[Record]:
    """Every valid record of a metrics.jsonl; a line that does not decode (a crash mid-write,
    an earlier release's record kind) is skipped."""
    return list(_valid_lines(path))


def _valid_lines(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                yield decode(json.loads(line), versionless=True)
            except (ValueError, RecursionError):
                continue


def of_kind(records: Sequence[Record], cls: type[Record]) -> list[Any]:
    """The records of exactly one kind (an EndRecord is not a StageRecord here)."""
    return [r for r in records if type(r) is cls]


@dataclass
class EvalTally:
    """Test-set sums of one epoch, per module of a stage, until they become EvalRecords.

    The sums may be device tensors (0-d): they are read once, when the records are made,
    so scoring a test set costs no host synchronization per batch.
    """

    modules: Sequence[int]
    epoch: int = -1
    correct: list[Any] = field(default_factory=list)
    loss: list[Any] = field(default_factory=list)
    samples: int = 0

    def __post_init__(self) -> None:
        self.correct = self.correct or [0] * len(self.modules)
        self.loss = self.loss or [0.0] * len(self.modules)

    def add(self, i: int, correct: Any, loss: Any) -> None:
        self.correct[i] = self.correct[i] + correct
        self.loss[i] = self.loss[i] + loss

    def records(self, steps: Sequence[int], stage: int) -> list[EvalRecord]:
        """One EvalRecord per module; ``steps[i]`` is module i's training step count."""
        n = max(self.samples, 1)
        return [
            EvalRecord(
                step=steps[i],
                epoch=self.epoch,
                module=module,
                stage=stage,
                accuracy=float(self.correct[i]) / n,
                loss=float(self.loss[i]) / n,
                samples=self.samples,
            )
            for i, module in enumerate(self.modules)
        ]
