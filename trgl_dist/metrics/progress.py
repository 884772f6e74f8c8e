"""The coordinator's live display: one compact line per interval for the whole pipeline."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("trgl_dist.metrics.coordinator")


class ProgressLine:
    """Latest loss/accuracy per module and the pipeline's rate, not K interleaved streams."""

    def __init__(self, num_modules: int, interval_s: float) -> None:
        self._num_modules = num_modules
        self._interval_s = interval_s
        self._latest: dict[int, dict[str, Any]] = {}
        self._stages: dict[int, dict[str, Any]] = {}
        self._tests: dict[Any, dict[int, float]] = {}
        self._where = (0, 0)
        self._last_log = 0.0
        self._fresh = False

    def observe(self, rec: dict[str, Any]) -> None:
        kind, module = rec.get("kind"), rec.get("module")
        if kind == "train" and isinstance(module, int):
            self._latest[module] = rec
            self._where = max(self._where, (rec.get("epoch") or 0, rec.get("step") or 0))
            self._fresh = True
        elif kind == "stage" and isinstance(rec.get("stage"), int):
            self._stages[rec["stage"]] = rec
        elif kind == "eval" and isinstance(module, int):
            scores = self._tests.setdefault(rec.get("epoch"), {})
            scores[module] = rec.get("accuracy") or 0.0
            if len(scores) == self._num_modules:
                self._log_tests(rec.get("epoch"), self._tests.pop(rec.get("epoch")))

    def _log_tests(self, epoch: Any, scores: dict[int, float]) -> None:
        accs = " ".join(f"m{k + 1} {100 * acc:.1f}%" for k, acc in sorted(scores.items()))
        shown = epoch + 1 if isinstance(epoch, int) else epoch
        logger.info("epoch %s test accuracy | %s", shown, accs)

    def maybe_log(self, now: float) -> None:
        if not self._fresh or now - self._last_log < self._interval_s:
            return
        modules = " ".join(
            f"m{k + 1} {rec.get('loss', float('nan')):.3f}/{100 * (rec.get('accuracy') or 0):.0f}%"
            for k, rec in sorted(self._latest.items())
        )
        epoch, step = self._where
        line = f"epoch {epoch + 1} step {step} | loss/train acc {modules}"
        if self._stages:  # every sample leaves through the last stage: its rate is the pipeline's
            last = self._stages[max(self._stages)]
            line += f" | {last.get('samples_per_s') or 0:.0f} samples/s"
        logger.info("%s", line)
        self._last_log, self._fresh = now, False
