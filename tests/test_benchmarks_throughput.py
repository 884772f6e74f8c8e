"""The throughput benchmark end to end with tiny sizes: every experiment lands in the JSON,
and the tables carry the standalone (alone, co-run) and in-run columns with their verdicts."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.helpers import run_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "throughput" / "run.py"
# A hard deadline, not a timing assert: three torchrun launches on a busy 2-core machine.
TIMEOUT_S = 300


def _positive(value: float) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


def test_tiny_run_writes_every_experiment(tmp_path: Path) -> None:
    done = run_script(SCRIPT, "--tiny", "--results", str(tmp_path), timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "throughput_tiny.json").read_text())
    assert result["environment"]["torch"] and result["environment"]["cores"] >= 1
    assert [e["threads"] for e in result["e2e"]] == [1]  # (a)
    assert all(_positive(e["samples_per_s"]) for e in result["e2e"])
    per_k = result["per_k"]["2"]
    assert _positive(per_k["parallel"][0]["samples_per_s"])  # (b)
    assert set(per_k["splits"]) == {"equal-depth", "equal-time"}  # (c), both splits
    for split, c in per_k["splits"].items():
        assert sum(c["blocks_per_module"]) == 9 and len(c["blocks_per_module"]) == 2, split
        assert _positive(c["samples_per_s"]) and _positive(c["efficiency"])
        assert _positive(c["c_over_a"]) and _positive(c["c_over_d"])
        assert len(c["stage_step_s"]) == 2 and all(_positive(s) for s in c["stage_step_s"])
        assert len(c["corun_step_s"]) == 2 and all(_positive(s) for s in c["corun_step_s"])
        assert _positive(c["corun_bound_samples_per_s"]) and _positive(c["efficiency_corun"])
        for stage in c["stages"]:
            assert 0 <= stage["busy"] <= 1 and 0 <= stage["wait_in"] + stage["wait_out"] <= 1
            for kind in ("alone", "corun"):  # median and spread over the repeats
                spread = stage[kind]
                assert len(spread["repeats_s"]) == result["method"]["repeats"] >= 2, kind
                assert spread["min_s"] <= spread["median_s"] <= spread["max_s"], kind
                assert all(n >= 1 for n in spread["steps"]), kind
            assert _positive(stage["compute_s_per_step"]) and stage["window"]["steps"] > 0
            for ratio in ("corun_over_alone", "inrun_over_corun"):
                assert _positive(stage[ratio]), ratio
            # One (c) run after each standalone repeat; the ratio is the median of the pairs.
            paired = stage["inrun_over_corun_spread"]
            assert len(paired["runs"]) == result["method"]["repeats"]
            assert paired["min"] <= stage["inrun_over_corun"] == paired["median"] <= paired["max"]
        assert len(c["runs"]) == result["method"]["repeats"]
        assert c["samples_per_s"] == c["samples_per_s_spread"]["median"]
        assert c["stages"][0]["transport_over_compute"] is not None
    assert per_k["splits"]["equal-time"]["blocks_per_module"] == result["equal_time"]["counts"]["2"]
    schedules = {(d["schedule"], d["microbatches"]) for d in per_k["pipelining"]}  # (d)
    assert schedules == {("gpipe", 2), ("1f1b", 2)}
    assert all(_positive(d["samples_per_s"]) for d in per_k["pipelining"])
    assert len(result["equal_time"]["block_ms"]) == 9
    table = (tmp_path / "throughput_tiny.md").read_text()
    for needle in ("(a) E2E", "(b) parallel", "(c) our pipeline", "ScheduleGPipe", "Schedule1F1B"):
        assert needle in table
    header = next(line for line in table.splitlines() if line.startswith("| K | split | stage"))
    for column in ("alone ms", "co-run ms", "in-run ms", "co-run/alone", "in-run/co-run",
                   "K=2: in-run/co-run <= 1.1"):  # fmt: skip
        assert f"| {column} |" in header, column
    for column in ("slowest co-run bound", "efficiency (co-run)", "K=2 equal-time: c/a >= 1.0"):
        assert f"| {column} |" in table, column
    equal_time = [line for line in table.splitlines() if line.startswith("| 2 | equal-time | ")]
    assert len(equal_time) == 3  # the efficiency row and the two stages
    assert all(line.rstrip(" |").endswith(("met", "MISSED")) for line in equal_time)
