"""The overhead benchmark end to end on a tiny model, and the prototype's exactness."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from trgl_dist.method import transport_cost

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "overhead" / "run.py"
TIMEOUT_S = 240


def _load_fused():
    """By file path under a unique name: other benchmark folders have modules named alike."""
    spec = importlib.util.spec_from_file_location("overhead_fused", SCRIPT.parent / "fused.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fused_prototype_matches_the_package():
    fused = _load_fused()
    torch.manual_seed(0)
    residues = [torch.randn(4, 8, 6, 6, requires_grad=True), torch.randn(4, 16, 3, 3) * 3]
    residues[1].requires_grad_(True)
    for norm in ("mean", "sum"):
        expected = transport_cost(residues, norm)
        want = torch.autograd.grad(expected, residues)
        got_value = fused.transport_cost(residues, norm)
        got = torch.autograd.grad(got_value, residues)
        torch.testing.assert_close(got_value, expected)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_tiny_run_writes_json_and_tables(tmp_path):
    flags = [
        "--model", "resnet-small", "--size", "8", "--width", "4", "--batch-size", "4",
        "--modules", "2", "3", "--steps", "2", "--warmup", "1", "--profile-steps", "1",
        "--repeats", "2", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "overhead.json").read_text())
    assert results["target"] == 1.03
    for impl in ("package", "prototype"):
        rows = results[impl]
        assert [r["modules"] for r in rows] == [2, 3]
        for row in rows:
            assert row["steps"] == 2
            assert len(row["per_module_ratio"]) == row["modules"]
            assert all(t > 0 for t in row["median_step_s"].values())
            assert row["ratio"] == row["median_step_s"]["trgl"] / row["median_step_s"]["vanilla"]
            assert row["paired_ratio_min"] <= row["paired_ratio_median"] <= row["paired_ratio_max"]
    ops = {r["op"] for r in results["profile"]["ops"]}
    assert "PowBackward0" in ops  # the transport's backward runs for TRGL only
    alone = results["transport_alone"]
    assert alone["residues"] == 9  # resnet-small: 9 residual blocks
    table = (tmp_path / "overhead.md").read_text()
    assert "| K | VanGL step s |" in table and "PowBackward0" in table
