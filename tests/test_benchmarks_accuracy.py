"""The accuracy study end to end on tiny synthetic sizes, and its confidence intervals."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accuracy" / "run.py"
VERDICT = re.compile(r"\*\*(confirmed|not confirmed|contradicted)\*\* \(-?\d+\.\d+ ± \d+\.\d+ ")


def _load_stats():
    """By file path under a unique name: other benchmark folders have modules named alike."""
    spec = importlib.util.spec_from_file_location("accuracy_stats", SCRIPT.parent / "stats.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stats = _load_stats()


def test_mean_ci_uses_student_t():
    stat = stats.mean_ci([0.80, 0.82, 0.84])
    # sd = 0.02, n = 3, t_{0.975,2} = 4.303
    assert stat["mean"] == pytest.approx(0.82)
    assert stat["ci95"] == pytest.approx(4.303 * 0.02 / 3**0.5)
    assert stats.mean_ci([0.5])["ci95"] is None


def test_paired_difference_matches_seeds():
    a = [{"seed": 0, "acc": 0.9}, {"seed": 1, "acc": 0.8}, {"seed": 2, "acc": 0.7}]
    b = [{"seed": 1, "acc": 0.7}, {"seed": 0, "acc": 0.8}]
    stat = stats.paired_difference(a, b, "acc")
    assert stat["n"] == 2
    assert stat["mean"] == pytest.approx(0.1)


def test_welch_difference_of_equal_variances():
    stat = stats.welch_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    # se = sqrt(1/3 + 1/3), df = 4: t = 2.776
    assert stat["mean"] == pytest.approx(1.0)
    assert stat["ci95"] == pytest.approx(2.776 * (2 / 3) ** 0.5)


def _smoke(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, "--smoke", "--out", str(out), *flags, timeout_s=280)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def _check_tables(out: Path) -> None:
    results = json.loads((out / "results.json").read_text())
    assert not results["partial"]
    # Every cell: two seeds, and a training accuracy (the last epoch's) beside the test one.
    cells = {(row["size"], row["method"]): row for row in results["main"]}
    assert set(cells) == {
        (96, "vanilla"), (96, "trgl"), (96, "multipliers"), (96, "e2e"),
        (192, "vanilla"), (192, "trgl"), (192, "e2e"),
    }  # fmt: skip
    assert all(row["last"]["n"] == 2 and row["train"]["n"] == 2 for row in cells.values())
    # K = 2 (the deeper cut) against the main runs' K = 4, same seeds.
    counts = {(row["modules"], row["gain_last"]["n"]) for row in results["module_counts"]}
    assert counts == {(2, 2), (4, 2)}
    assert [len(d["by_module"]) for d in results["per_module_differences"]] == [4, 4]
    assert [row["size"] for row in results["saturation"]] == [96, 192]
    table = (out / "table.md").read_text()
    assert "train acc., last epoch (%)" in table
    assert "| 96 | TRGL-mult |" in table and "| 192 | E2E |" in table
    assert "| 2 | 2 | 2 |" in table and "| 4 | 1 | 2 |" in table  # K, blocks, seeds
    verdicts = [line for line in table.splitlines() if line.startswith("- ")]
    # 2 sizes x (TRGL vs VanGL, depth x 2, vs E2E) + scarcity + modules + 2 multipliers.
    assert len(verdicts) == 12
    assert all(VERDICT.search(line) for line in verdicts), verdicts
    assert (out / "accuracy_by_module.png").stat().st_size > 0


def _check_choices(out: Path, records: list[dict]) -> None:
    """Tuning never looks at the test set, and picks the best validation score."""
    assert all(r["validation"] == (r["phase"] in ("lr", "tau", "mult")) for r in records)
    choice = json.loads((out / "results.json").read_text())["choice"]
    for size, tau in choice["tau"].items():
        sweep = [r for r in records if r["phase"] == "tau" and r["size"] == int(size)]
        best = max(sweep, key=lambda r: r["last_module_accuracy"])
        assert best["last_module_accuracy"] == next(
            r["last_module_accuracy"] for r in sweep if r["tau"] == tau
        )
    trgl = [r for r in records if r["phase"] == "main" and r["method"] == "trgl"]
    assert {(r["size"], r["tau"]) for r in trgl} == {(int(s), t) for s, t in choice["tau"].items()}


def test_smoke_study_writes_tables_plot_and_resumes(tmp_path):
    done = _smoke(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    records = _records(tmp_path)
    assert all(r["status"] == "ok" for r in records)
    assert {r["phase"] for r in records} == {"lr", "tau", "mult", "main", "deep"}
    assert len({r["id"] for r in records}) == len(records) == 25
    _check_tables(tmp_path)
    _check_choices(tmp_path, records)
    # Interrupted study: the last two runs never recorded, and one final run failed.
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()[:-2]
    failed = next(i for i, r in enumerate(records) if r["phase"] == "main")
    lines[failed] = json.dumps({**records[failed], "status": "failed"})
    (tmp_path / "runs.jsonl").write_text("\n".join(lines) + "\n")
    again = _smoke(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    retrained = set(re.findall(r"\] training (\S+)", again.stderr))
    assert retrained == {records[failed]["id"], records[-1]["id"], records[-2]["id"]}
    assert {r["id"] for r in _records(tmp_path)} == {r["id"] for r in records}
    _check_tables(tmp_path)


def test_report_only_on_missing_runs_is_labelled_partial(tmp_path):
    done = _smoke(tmp_path, "--report-only")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["partial"]
    assert "PARTIAL" in (tmp_path / "table.md").read_text()
