"""The overhead benchmark end to end on a tiny model, and its in-graph baseline's exactness
over many steps (the loss itself: tests/test_method.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from tests.helpers import run_script
from trgl_dist.config import Config
from trgl_dist.method import literal_local_loss, local_loss
from trgl_dist.network.models import InputSpec, build_backbone
from trgl_dist.network.modules import build_modules
from trgl_dist.training.learner import ModuleLearner

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "overhead" / "run.py"
TIMEOUT_S = 240


def test_learner_trains_alike_with_both_losses_over_many_steps():
    """A module trained for several steps (SGD with momentum, BatchNorm statistics) through
    ModuleLearner.train_step ends with the same parameters and running statistics whether
    the transport gradient comes from the hooks or from W in the graph (float64: rounding
    aside, the two are one objective), so the benchmark's baseline is a fair one."""
    torch.manual_seed(0)
    spec = InputSpec(3, 8, 10)
    backbone = build_backbone("resnet-small", spec, num_modules=2, width=4)
    initial = build_modules(backbone, [5, 4], spec)[0].double()
    config = Config().replace("model", name="resnet-small", modules=2, width=4)
    data = [
        (torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (8,))) for _ in range(6)
    ]
    trained = []
    for loss_fn in (local_loss, literal_local_loss):
        module = copy.deepcopy(initial)
        learner = ModuleLearner(0, module, config, tau=0.05, loss_fn=loss_fn)
        for x, y in data:
            learner.train_step(x, y)
        trained.append(module.state_dict())
    hooks, graph = trained
    assert any(not torch.equal(v, initial.state_dict()[k]) for k, v in hooks.items())
    for name in hooks:
        torch.testing.assert_close(hooks[name], graph[name], rtol=1e-10, atol=1e-12)


def test_tiny_run_writes_json_and_tables(tmp_path):
    flags = [
        "--model", "resnet-small", "--size", "8", "--width", "4", "--batch-size", "4",
        "--modules", "2", "3", "--steps", "2", "--warmup", "1", "--profile-steps", "1",
        "--out", str(tmp_path),
    ]  # fmt: skip
    done = run_script(SCRIPT, *flags, timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "overhead.json").read_text())
    assert results["target"] == 1.03
    for impl in ("package", "graph"):
        rows = results[impl]
        assert [r["modules"] for r in rows] == [2, 3]
        for row in rows:
            assert row["steps"] == 2
            assert len(row["per_module_ratio"]) == row["modules"]
            assert all(t > 0 for t in row["median_step_s"].values())
            assert row["ratio"] == row["median_step_s"]["trgl"] / row["median_step_s"]["vanilla"]
            assert row["paired_ratio_min"] <= row["paired_ratio_median"] <= row["paired_ratio_max"]
    ops = {r["op"]: r for r in results["profile"]["package"]["ops"]}
    # W in the graph: its backward (PowBackward) runs for TRGL only; the package has none.
    graph_ops = {r["op"]: r for r in results["profile"]["graph"]["ops"]}
    assert graph_ops["PowBackward0"]["vanilla_ms"] == 0 < graph_ops["PowBackward0"]["trgl_ms"]
    assert "PowBackward0" not in ops
    table = (tmp_path / "overhead.md").read_text()
    assert "| K | VanGL step s |" in table and "PowBackward0" in table
