"""Typed records for the tests, with plausible values; each builder takes what a test varies."""

from __future__ import annotations

from trgl_dist.metrics.records import (
    EndRecord,
    EpochRecord,
    ErrorRecord,
    EvalRecord,
    TrainRecord,
)


def train(
    module: int, epoch: int, step: int, samples: int = 32, stage: int = 0, **values: float
) -> TrainRecord:
    fields = {"loss": 1.5, "ce": 1.25, "transport": 0.5, "accuracy": 0.5, "tau": 1.0, **values}
    return TrainRecord(
        step=step, epoch=epoch, module=module, stage=stage, samples=samples, **fields
    )


def evaluation(
    module: int, epoch: int, accuracy: float, stage: int = 0, step: int | None = None
) -> EvalRecord:
    step = 100 * (epoch + 1) if step is None else step
    return EvalRecord(
        step=step, epoch=epoch, module=module, stage=stage, accuracy=accuracy, loss=1.0,
        samples=1000,
    )


def epoch(epoch: int, step: int, seconds: float) -> EpochRecord:
    return EpochRecord(step=step, epoch=epoch, stage=0, seconds=seconds)


def end(
    stage: int,
    busy: float = 1.0,
    wait_in: float = 0.0,
    wait_out: float = 0.0,
    rate: float = 1.0,
    **values: float,
) -> EndRecord:
    rank = int(values.pop("rank", stage))
    fields = {
        "samples": 2000,
        "inbox_depth": 0,
        "bytes_sent": 1024 * stage,
        "peak_rss_mb": 100.0 + stage,
        "peak_tensor_mb": 10.0 + stage,
        "staleness_mean": None,
        "cuda_peak_mb": None,
        **values,
    }
    return EndRecord(
        step=200,
        epoch=1,
        stage=stage,
        rank=rank,
        modules=(2 * stage, 2 * stage + 1),
        busy_s=busy,
        wait_in_s=wait_in,
        wait_out_s=wait_out,
        samples_per_s=rate,
        **fields,
    )


def error(stage: int, cause: str, peer: int | None = None, message: str = "") -> ErrorRecord:
    return ErrorRecord(
        step=-1, epoch=-1, stage=stage, rank=stage, message=message, cause=cause, peer=peer
    )
