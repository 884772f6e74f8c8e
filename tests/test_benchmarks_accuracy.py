"""The accuracy study end to end on tiny synthetic sizes, and its confidence intervals."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accuracy" / "run.py"


def _load_stats():
    """By file path under a unique name: other benchmark folders have modules named alike."""
    spec = importlib.util.spec_from_file_location("accuracy_stats", SCRIPT.parent / "stats.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stats = _load_stats()
mean_ci, paired_difference = stats.mean_ci, stats.paired_difference


def test_mean_ci_uses_student_t():
    stat = mean_ci([0.80, 0.82, 0.84])
    # sd = 0.02, n = 3, t_{0.975,2} = 4.303
    assert stat["mean"] == pytest.approx(0.82)
    assert stat["ci95"] == pytest.approx(4.303 * 0.02 / 3**0.5)
    assert mean_ci([0.5])["ci95"] is None


def test_paired_difference_matches_seeds():
    a = [{"seed": 0, "acc": 0.9}, {"seed": 1, "acc": 0.8}, {"seed": 2, "acc": 0.7}]
    b = [{"seed": 1, "acc": 0.7}, {"seed": 0, "acc": 0.8}]
    stat = paired_difference(a, b, "acc")
    assert stat["n"] == 2
    assert stat["mean"] == pytest.approx(0.1)


def _smoke(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )


def test_smoke_study_writes_tables_plot_and_resumes(tmp_path):
    done = _smoke(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in runs)
    phases = {r["phase"] for r in runs}
    assert phases == {"sweep", "main", "pipeline", "regimes", "modules"}
    # Tuning never looks at the test set: every sweep run scored the validation split.
    assert all(r["validation"] for r in runs if r["phase"] == "sweep")
    assert not any(r["validation"] for r in runs if r["phase"] != "sweep")
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["partial"]
    methods = {(row["method"], row["last"]["n"]) for row in results["main"]}
    assert methods == {("vanilla", 2), ("trgl", 2), ("e2e", 2)}
    # The pipeline runtime's contract: same seed, same accuracy as the parallel regime.
    assert results["pipeline_check"]["max_abs_difference"] == pytest.approx(0.0, abs=1e-6)
    # The same network cut into fewer modules, next to the main runs' K.
    counts = {(row["modules"], row["gain_last"]["n"]) for row in results["module_counts"]}
    assert counts == {(2, 2), (4, 2)}
    table = (tmp_path / "table.md").read_text()
    assert "Gain larger with more modules?" in table
    assert "| VanGL |" in table and "| TRGL |" in table and "| E2E |" in table
    assert (tmp_path / "accuracy_by_module.png").stat().st_size > 0
    # A second invocation finds every run recorded and trains nothing.
    again = _smoke(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stderr
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(runs)


def test_report_only_on_missing_runs_is_labelled_partial(tmp_path):
    done = _smoke(tmp_path, "--report-only")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["partial"]
    assert "PARTIAL" in (tmp_path / "table.md").read_text()
