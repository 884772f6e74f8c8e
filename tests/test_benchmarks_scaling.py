"""The scaling benchmark end to end with tiny sizes: the planner's layout, every plain split
and E2E land in the JSON, each pipeline stage with the planner's prediction beside the
measurement, and the markdown carries both tables."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.helpers import run_script

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "benchmarks" / "scaling"
SCRIPT = FOLDER / "run.py"
# A hard deadline, not a timing assert: five launches and the planner on a busy machine.
TIMEOUT_S = 900


def _positive(value: object) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


def test_contiguous_splits_and_layout_names() -> None:
    folders = [str(FOLDER), str(FOLDER.parent)]  # the benchmark and benchmarks/ (benchenv)
    sys.path[:0] = folders
    try:
        from experiments import contiguous_splits, layout_name
    finally:
        for folder in folders:
            sys.path.remove(folder)
    assert contiguous_splits(4, 3) == [(1, 1, 2), (1, 2, 1), (2, 1, 1)]
    assert contiguous_splits(3, 3) == [(1, 1, 1)]
    assert all(sum(s) == 6 and len(s) == 2 for s in contiguous_splits(6, 2))
    assert len(contiguous_splits(6, 2)) == 5
    assert layout_name((1, 3), (2, 1)) == "1x2+3"
    assert layout_name((2, 1, 1), (1, 1, 1)) == "2+1+1"


@pytest.mark.slow
def test_tiny_run_writes_every_experiment(tmp_path: Path) -> None:
    done = run_script(SCRIPT, "--tiny", "--out", str(tmp_path), timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "scaling_tiny.json").read_text())
    setting, plan = result["setting"], result["plan"]
    assert sum(plan["replicas"]) == setting["ranks"] == 3
    assert sum(plan["stage_modules"]) == setting["modules"] == 4
    kinds = [e["kind"] for e in result["experiments"].values()]
    assert kinds.count("a") == 3 and kinds.count("b") == 1 and kinds.count("c") == 1
    assert result["best_a"] in result["experiments"]
    for name, e in result["experiments"].items():
        assert _positive(e["samples_per_s"]["median"]), name
        if e["kind"] == "c":
            continue
        assert _positive(e["predicted_samples_per_s"]["median"]), name
        assert [s["replicas"] for s in e["stages"]] == e["replicas"], name
        modules = [m for s in e["stages"] for m in s["modules"]]
        assert modules == [1, 2, 3, 4], name  # every module once, in order, 1-based
        for s in e["stages"]:
            for key in ("predicted_step_ms", "step_ms", "predicted_peak_mib", "peak_mib"):
                assert _positive(s[key]["median"]), (name, key)
            predicted, measured = s["predicted_step_ms"]["median"], s["step_ms"]["median"]
            error = (predicted - measured) / measured  # one repeat: the median is the value
            assert math.isclose(s["step_error"]["median"], error, rel_tol=1e-9), name
    assert all(_positive(r) for r in result["ratios"].values())
    table = (tmp_path / "scaling_tiny.md").read_text()
    assert "#### Samples per second" in table and "#### Per stage" in table
    assert plan["table"] in table
    assert not (FOLDER / "results" / "scaling_tiny.json").exists()  # only --out is written
