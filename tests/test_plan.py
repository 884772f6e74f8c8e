"""The planner: its cost model on known numbers, its search, the command, and a run that
uses it (--plan auto) with the prediction and the trace in the run directory."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys

import pytest

from tests.launcher import torchrun
from trgl_dist.metrics.trace import validate
from trgl_dist.planning.model import (
    Machine,
    ModuleCost,
    Workload,
    balance,
    predict,
    search,
)

FREE = Machine(math.inf, allreduce_mib_per_s=1000.0, allreduce_latency_s=0.0)


def _work(seconds, grad_mib=10.0, state_mib=1.0, step_mib=4.0, out_mib=0.5, buffer_size=2):
    grads = grad_mib if isinstance(grad_mib, list) else [grad_mib] * len(seconds)
    costs = tuple(
        ModuleCost(t, state_mib, step_mib, g, out_mib) for t, g in zip(seconds, grads, strict=True)
    )
    return Workload(costs, batch_size=10, buffer_size=buffer_size, input_mib=0.25)


def test_a_layout_is_as_fast_as_its_slowest_stage_per_replica():
    work = _work([0.03, 0.01, 0.01, 0.01])
    plain = predict(work, (1, 3), (1, 1), FREE)
    assert [s.step_s for s in plain.stages] == pytest.approx([0.03, 0.03])
    assert plain.samples_per_s == pytest.approx(10 / 0.03)
    # Two replicas of stage 0: each takes every other batch, plus its share of an
    # all-reduce of 10 MiB: 2 (R - 1) / R * 10 MiB at 1000 MiB/s = 10 ms.
    replicated = predict(work, (1, 3), (2, 1), FREE)
    assert replicated.stages[0].step_s == pytest.approx(0.04)
    assert replicated.batches_per_s == pytest.approx(min(2 / 0.04, 1 / 0.03))
    assert replicated.bottleneck == 1


def test_processes_sharing_too_few_cores_share_them_while_both_are_busy():
    one_core = Machine(1.0, allreduce_mib_per_s=1000.0, allreduce_latency_s=0.0)
    shared = predict(_work([0.03, 0.03]), (1, 1), (1, 1), one_core)
    assert shared.batches_per_s == pytest.approx(1 / 0.06)  # the core's 1 s / 60 ms of work
    assert [s.step_s for s in shared.stages] == pytest.approx([0.06, 0.06])
    uneven = predict(_work([0.03, 0.01]), (1, 1), (1, 1), one_core)
    # The core is never idle (stage 0 always has work): 40 ms of work a batch.
    assert uneven.batches_per_s == pytest.approx(1 / 0.04)
    # Stage 1 only computes while stage 0 does too, so at half a core: 10 ms take 20 ms.
    # Stage 0 has the core alone while stage 1 waits: 30 ms take 40 ms.
    assert [s.step_s for s in uneven.stages] == pytest.approx([0.04, 0.02])


def test_a_light_stage_beside_a_busy_one_on_two_cores_waits_when_all_three_are_busy():
    two_cores = Machine(2.0, allreduce_mib_per_s=1000.0, allreduce_latency_s=0.0)
    p = predict(_work([0.08, 0.02, 0.03]), (1, 1, 1), (1, 1, 1), two_cores)
    step = [s.step_s for s in p.stages]
    # Each stage's share of a core while busy, from the others' busy fractions (b = rate x
    # step, stage 0 always busy): a stage waits only while all three are runnable.
    busy = [min(1.0, p.batches_per_s * t) for t in step]
    assert busy[0] == pytest.approx(1.0)
    for s, w in enumerate([0.08, 0.02, 0.03]):
        both = busy[(s + 1) % 3] * busy[(s + 2) % 3]
        assert step[s] == pytest.approx(w / (1 - both + both * 2 / 3), rel=1e-6)
    assert step[1] / 0.02 > step[0] / 0.08  # the light stage stretches more than the heavy
    # A core per rank: no sharing at all.
    alone = predict(_work([0.08, 0.02, 0.03]), (1, 1, 1), (1, 1, 1),
                    Machine(3.0, allreduce_mib_per_s=1000.0, allreduce_latency_s=0.0))
    assert [s.step_s for s in alone.stages] == pytest.approx([0.08, 0.02, 0.03])


def test_memory_holds_the_state_the_largest_step_and_queues_before_the_bottleneck():
    work = _work([0.01, 0.05, 0.01], state_mib=2.0, step_mib=4.0, out_mib=0.5)
    p = predict(work, (1, 1, 1), (1, 1, 1), FREE)
    assert p.bottleneck == 1
    # stage 0: state + step, a full outbox (2 x 0.5); stage 1: a full inbox; stage 2 none
    assert [s.peak_mib for s in p.stages] == pytest.approx([7.0, 7.0, 6.0])
    two = predict(work, (2, 1), (1, 1), FREE)
    assert two.stages[0].peak_mib == pytest.approx(2 * 2.0 + 4.0 + 0.0)  # it is the bottleneck


def _brute_force(work, replicas):
    k, best = len(work.costs), (math.inf, None)
    for cuts in itertools.combinations(range(1, k), len(replicas) - 1):
        edges = (0, *cuts, k)
        counts = tuple(b - a for a, b in itertools.pairwise(edges))
        load = max(
            work.compute_s(range(a, b), n, FREE) / n
            for (a, b), n in zip(itertools.pairwise(edges), replicas, strict=True)
        )
        best = min(best, (load, counts))
    return best


def test_balance_finds_the_split_a_brute_force_finds():
    rng = random.Random(7)
    for _ in range(40):
        work = _work([rng.uniform(0.001, 0.05) for _ in range(rng.randint(3, 8))])
        replicas = tuple(rng.randint(1, 3) for _ in range(rng.randint(1, len(work.costs))))
        counts = balance(work, replicas, FREE)
        load = max(
            s.compute_s / s.replicas for s in predict(work, counts, replicas, FREE).stages
        )
        assert load == pytest.approx(_brute_force(work, replicas)[0])


def test_the_search_replicates_an_unsplittable_bottleneck_and_respects_the_memory_cap():
    # Module 1 computes much and has few parameters (a stem at full resolution), the others
    # have many: replicating them costs all-reduces, replicating module 1 costs little.
    work = _work([0.04, 0.01, 0.01, 0.01], grad_mib=[0.1, 50.0, 50.0, 50.0])
    best = search(work, 3, FREE)
    assert (best.stage_modules, best.replicas) == ((1, 3), (2, 1))
    assert best.samples_per_s > predict(work, (1, 1, 2), (1, 1, 1), FREE).samples_per_s
    assert search(work, 3, FREE, memory_cap_mib=1.0) is None  # no module fits
    # 10 MiB a replica: one stage of all four modules (4 x 1 + 4 + 0.5) fits, the rest too
    capped = search(_work([0.01] * 4, step_mib=4.0), 1, FREE, memory_cap_mib=8.0)
    assert capped is not None and capped.stage_modules == (4,)
    assert search(_work([0.01] * 4, step_mib=4.0), 1, FREE, memory_cap_mib=7.9) is None


PLAN = [sys.executable, "-m", "trgl_dist.plan", "--dataset", "synthetic", "--model",
        "resnet-small", "--width", "8", "--batch-size", "16", "--modules", "4"]


def test_the_plan_command_prints_a_table_and_the_command_to_run_it():
    done = subprocess.run([*PLAN, "--world-size", "3"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["stage", "modules", "blocks", "replicas", "step", "ms", "peak",
                                "MiB", "samples/s"]
    rows = [line.split() for line in lines[1:] if line.split() and line.split()[0].isdigit()]
    assert sum(int(r[3]) for r in rows) == 3  # the replicas use every rank
    assert sum(int(r[2]) for r in rows) == 9  # resnet-small's blocks, each in one stage
    assert any(line.startswith("predicted: ") for line in lines)
    assert "--stage-replicas" in lines[-1]


@pytest.mark.parametrize(("args", "needle"), [
    (["--world-size", "0"], "--world-size must be >= 1"),
    (["--world-size", "2", "--memory-cap", "0.5"], "fits every replica under"),
    (["--world-size", "2", "--device", "tpu"], "not a device"),
])
def test_the_plan_command_refuses_in_one_line(args, needle):
    done = subprocess.run([*PLAN, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_plan_auto_trains_with_its_layout_and_reports_it_against_the_measurement(tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--model", "resnet-small", "--width", "8",
            "--batch-size", "16", "--modules", "4", "--synthetic-train", "512", "--epochs", "1",
            "--plan", "auto", "--trace", "--out", str(out)]
    launch = torchrun(3, args)
    assert launch.code == 0, launch.output
    summary = json.loads((out / "summary.json").read_text())
    predicted = summary["prediction"]
    assert predicted["plan"] == "auto"
    assert sum(s["replicas"] for s in predicted["stages"]) == 3
    assert [s["replicas"] for s in summary["stages"]] == [
        s["replicas"] for s in predicted["stages"]
    ]
    for stage in summary["stages"]:
        assert stage["step_ms"] > 0 and stage["step_peak_mb"] > 0
    report = (out / "report.md").read_text()
    assert "## Plan against measurement" in report
    assert (out / "plots" / "timeline.png").stat().st_size > 10_000
    trace = json.loads((out / "trace.json").read_text())
    assert validate(trace) == []
    names = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {"forward m1", "backward m1", "step m1", "send", "receive"} <= names
    assert {e["pid"] for e in trace["traceEvents"]} == {1, 2, 3}  # pid = rank + 1
    # the run records the layout as the user gave it (none): a resume may lay out anew
    assert "stage_replicas = []" in (out / "config.toml").read_text()
