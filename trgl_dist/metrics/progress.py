"""The live display: one compact line per interval for the whole run, not K streams."""

from __future__ import annotations

import logging

from trgl_dist.metrics.records import EvalRecord, Record, StageRecord, TrainRecord

logger = logging.getLogger("trgl_dist.coordinator")


class ProgressLine:
    """Latest loss/accuracy per module and the run's rate; test accuracies once complete."""

    def __init__(self, num_modules: int, interval_s: float) -> None:
        self._num_modules = num_modules
        self._interval_s = interval_s
        self._latest: dict[int, TrainRecord] = {}
        self._stages: dict[int, StageRecord] = {}
        self._tests: dict[int, dict[int, float]] = {}
        self._where = (0, 0)
        self._last_log = 0.0
        self._fresh = False

    def observe(self, rec: Record) -> None:
        if isinstance(rec, TrainRecord):
            self._latest[rec.module] = rec
            self._where = max(self._where, (rec.epoch, rec.step))
            self._fresh = True
        elif isinstance(rec, StageRecord):
            self._stages[rec.stage] = rec
        elif isinstance(rec, EvalRecord):
            scores = self._tests.setdefault(rec.epoch, {})
            scores[rec.module] = rec.accuracy
            if len(scores) == self._num_modules:
                self._log_tests(rec.epoch, self._tests.pop(rec.epoch))

    def _log_tests(self, epoch: int, scores: dict[int, float]) -> None:
        accs = " ".join(f"m{k + 1} {100 * acc:.1f}%" for k, acc in sorted(scores.items()))
        logger.info("epoch %s test accuracy | %s", epoch + 1, accs)

    def maybe_log(self, now: float) -> None:
        if not self._fresh or now - self._last_log < self._interval_s:
            return
        modules = " ".join(
            f"m{k + 1} {rec.loss:.3f}/{100 * rec.accuracy:.0f}%"
            for k, rec in sorted(self._latest.items())
        )
        epoch, step = self._where
        line = f"epoch {epoch + 1} step {step} | loss/train acc {modules}"
        if self._stages:  # every sample leaves through the last stage: its rate is the run's
            line += f" | {self._stages[max(self._stages)].samples_per_s:.0f} samples/s"
        logger.info("%s", line)
        self._last_log, self._fresh = now, False
