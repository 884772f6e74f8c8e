"""The memory benchmark end to end on a tiny model: JSON structure, tables, sanity of peaks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.helpers import run_script

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "benchmarks" / "memory"
TIMEOUT_S = 240
TINY = ["--model", "resnet-small", "--size", "16", "--width", "4", "--batch-size", "8"]
CATEGORIES = ("params", "grads", "optimizer", "activations", "temp", "bn_buffers", "batch_buffers")


def _run(script: str, *flags: str) -> subprocess.CompletedProcess:
    return run_script(FOLDER / script, *flags, timeout_s=TIMEOUT_S)


def _check_peak(peak: dict) -> None:
    assert set(CATEGORIES) <= set(peak)
    assert peak["total"] > 0
    assert abs(sum(peak[c] for c in CATEGORIES) - peak["total"]) < 1e-6 * peak["total"] + 1e-9


def test_tiny_grid_writes_json_and_tables(tmp_path):
    flags = [
        *TINY,
        "--modules",
        "3",
        "--splits",
        "equal-depth",
        "--methods",
        "vanilla",
        "trgl",
        "trgl-graph",
    ]
    done = _run("run.py", *flags, "--breakdown-modules", "3", "--no-check", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "memory.json").read_text())
    assert results["setting"]["model"] == "resnet-small"
    assert results["environment"]["torch"] == __import__("torch").__version__
    e2e = results["e2e"]["3"]
    _check_peak(e2e)
    assert e2e["temp"] == 0  # E2E peaks at the end of the forward pass
    assert [c["method"] for c in results["configs"]] == ["vanilla", "trgl", "trgl-graph"]
    for config in results["configs"]:
        assert config["counts"] == [3, 3, 3]
        _check_peak(config["lockstep"])
        # Module-wise: one module's activations at a time, below E2E's whole graph.
        assert config["lockstep"]["total"] < e2e["total"]
        assert config["lockstep"]["batch_buffers"] == 0
        assert [s["stage"] for s in config["stages"]] == [0, 1, 2]
        for stage in config["stages"]:
            for phase in ("train", "epoch_end", "test"):
                _check_peak(stage[phase])
            assert stage["worst"]["total"] >= stage["train"]["total"]
            assert stage["train"]["total"] < e2e["total"]
        first, middle, last = config["stages"]
        # Stage 1 has only an outbox, stage 3 only an inbox, stage 2 both.
        assert 0 < first["train"]["batch_buffers"] < middle["train"]["batch_buffers"]
        assert 0 < last["train"]["batch_buffers"] < middle["train"]["batch_buffers"]
        assert first["epoch_end"]["total"] == first["train"]["total"]  # no inbox
    vanilla, trgl, graph = (c["lockstep"] for c in results["configs"])
    # W in the graph: every residue's transport gradient exists at the start of the backward
    # (temp); the package adds each one when the backward reaches its block.
    assert trgl["total"] < graph["total"]
    assert trgl["temp"] < graph["temp"]
    # No more saved activations than VanGL; TRGL's only extra is keeping the residues
    # themselves until the backward reaches them (temp), less than the activations anyway.
    assert trgl["activations"] <= vanilla["activations"] * 1.01
    assert vanilla["total"] < trgl["total"] < vanilla["total"] + vanilla["activations"]
    table = (tmp_path / "memory.md").read_text()
    assert "| K | split | method |" in table
    assert "| lock-step |" in table and "| stage 3 |" in table


def test_rss_probe_reports_growth(tmp_path):
    setting = json.dumps({"model": "resnet-small", "size": 16, "width": 4, "batch_size": 8})
    flags = ["--setting", setting, "--modules", "2", "--regime", "parallel", "--steps", "1"]
    done = _run("rss_probe.py", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["regime"] == "parallel"
    assert result["peak_rss_mib"] >= result["baseline_rss_mib"] > 0
    assert result["growth_mib"] >= 0
