"""The `python -m trgl_dist.train` command: every regime end to end, and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trgl_dist.metrics.records import read_records
from trgl_dist.train import main


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["e2e", "parallel", "sequential", "multilap"])
def test_each_regime_runs_resnet110_and_writes_the_run_directory(tmp_path, regime):
    out = tmp_path / regime
    code = main(["--dataset", "synthetic", "--model", "resnet110", "--modules", "4",
                 "--regime", regime, "--method", "trgl", "--max-steps", "2", "--batch-size", "8",
                 "--synthetic-test", "32", "--out", str(out)])
    assert code == 0
    assert {"config.toml", "metrics.jsonl", "summary.json"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["regime"] == regime and summary["blocks_per_module"] == [14, 14, 13, 13]
    kinds = {r.kind for r in read_records(out / "metrics.jsonl")}
    assert {"train", "eval", "epoch"} <= kinds


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "trgl_dist.train", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "resnet110", "--modules", "100"], "cannot split 54 blocks of resnet110"),
        (["--epochs", "-1"], "train.epochs must be >= 0"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--train-size", "999999"], "larger than the training set"),
        (["--model", "resnet7"], "unknown model 'resnet7'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    result = _cli("--dataset", "synthetic", "--out", str(tmp_path / "r"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
