"""Scaling past an unsplittable first module: replicas against the best plain split and E2E.

On N ranks, with a model whose first module outweighs the rest together:
  (a) a/...   every contiguous split of the K modules into N stages, one rank each
  (b) b/...   the planner's layout (`python -m trgl_dist.plan --world-size N`): stages
              and replicas per stage, the heavy first stage replicated
  (c) c/e2e   E2E back-propagation in one process, torch's default threads
Each run is the real CLI (torchrun for (a) and (b)); its summary.json gives the planner's
per-stage prediction for the layout it ran beside the measured step time and memory.
Writes results/scaling.json and .md and the README's table (``_quick``/``_tiny``: only
the results files).

    python benchmarks/scaling/run.py            # the full run: alone on the machine
    python benchmarks/scaling/run.py --quick    # same setting, a few steps, one repeat
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# This folder, the repo root (trgl_dist without installing it) and benchmarks/ (benchenv).
sys.path[:0] = [str(HERE), str(HERE.parents[1]), str(HERE.parent)]

import processes  # noqa: E402
from benchenv import child_environment, environment, write_outputs  # noqa: E402
from experiments import Experiment, Setting, experiments, planner_command  # noqa: E402
from outcome import STEADY, aggregate, module_steps, run_numbers  # noqa: E402
from tables import markdown  # noqa: E402

from trgl_dist.planning.profile import usable_cores  # noqa: E402

log = logging.getLogger("scaling")
NAME = "scaling"
RESULTS = HERE / "results"
# resnet-small at width 8, K = 4 equal-depth modules of [3, 2, 2, 2] blocks: module 1 holds
# the stem and the three full-resolution blocks, more compute than modules 2-4 together.
SETTING = {"model": "resnet-small", "width": 8, "modules": 4, "split": "equal-depth", "ranks": 3}
PRESETS: dict[str, dict[str, Any]] = {
    "full": {**SETTING, "batch_size": 64, "steps": 400, "repeats": 3, "timeout_s": 900.0},
    "quick": {**SETTING, "batch_size": 64, "steps": 24, "repeats": 1, "timeout_s": 300.0},
    "tiny": {**SETTING, "width": 4, "batch_size": 16, "steps": 24, "repeats": 1,
             "timeout_s": 150.0},
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="the same setting, 24 steps, 1 repeat")
    p.add_argument(
        "--tiny", action="store_true", help="smoke-test sizes (width 4, batch 16, 24 steps)"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the results files")
    p.add_argument(
        "--work-dir", type=Path, help="keep the run directories and logs here (default: a "
        "temporary folder, removed at the end)",
    )  # fmt: skip
    p.add_argument("--render", type=Path, help="only rewrite the markdown of this results JSON")
    args = p.parse_args(argv)
    args.preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    return args


def e2e_threads() -> int:
    """torch's thread count in a process started as the E2E run is."""
    probe = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]
    done = subprocess.run(probe, env=child_environment(None), capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    return int(done.stdout.strip())


def make_plan(setting: Setting, work: Path, timeout_s: float) -> dict[str, Any]:
    out = work / "plan.json"
    log.info("planning %d ranks (profiling the blocks side by side) ...", setting.ranks)
    processes.run(planner_command(setting, out), work / "plan.log", timeout_s, None)
    plan = json.loads(out.read_text())
    log.info("the planner's layout:\n%s", plan["table"])
    return plan


def run_all(
    found: list[Experiment], setting: Setting, repeats: int, work: Path, timeout_s: float
) -> dict[str, list[dict[str, Any]]]:
    """Every experiment ``repeats`` times, interleaved: a drift of the machine touches all."""
    runs: dict[str, list[dict[str, Any]]] = {e.name: [] for e in found}
    total, done = repeats * len(found), 0
    for repeat in range(repeats):
        for e in found:
            done += 1
            run_dir = work / f"r{repeat}" / e.name.replace("/", "_")
            log.info("[%d/%d] %s, repeat %d: %d process(es) ...", done, total, e.name,
                     repeat + 1, e.processes)  # fmt: skip
            started = time.perf_counter()
            log_file = run_dir.with_suffix(".log")
            processes.run(e.command(setting, run_dir), log_file, timeout_s, e.threads)
            numbers = {**run_numbers(run_dir), "repeat": repeat,
                       "wall_s": time.perf_counter() - started}  # fmt: skip
            runs[e.name].append(numbers)
            log.info("[%d/%d] %s: %.1f samples/s, predicted %s, %.0f s", done, total,
                     e.name, numbers["samples_per_s"],
                     _rate(numbers["predicted_samples_per_s"]), numbers["wall_s"])  # fmt: skip
    return runs


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def summarize(found: list[Experiment], runs: dict[str, list[dict[str, Any]]],
              threads: int) -> dict[str, Any]:  # fmt: skip
    """Per experiment its repeats and their medians; the best (a); the ratios."""
    out: dict[str, Any] = {}
    for e in found:
        out[e.name] = {
            **e.describe(),
            "threads": 1 if e.pipeline else threads,
            **aggregate(runs[e.name]),
            "runs": runs[e.name],
        }

    def median(name: str) -> float:
        return float(out[name]["samples_per_s"]["median"])

    best = max((e.name for e in found if e.kind == "a"), key=median)
    (b,) = (e.name for e in found if e.kind == "b")
    return {
        "experiments": out,
        "best_a": best,
        "ratios": {
            "b_over_best_a": median(b) / median(best),
            "b_over_c": median(b) / median("c/e2e"),
            "best_a_over_c": median(best) / median("c/e2e"),
        },
    }


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    setting = Setting(**{k: v for k, v in preset.items() if k not in ("repeats", "timeout_s")})
    threads = e2e_threads()
    env = environment("benchmarks/scaling/run.py", cores=usable_cores(),
                      e2e_threads=threads)  # fmt: skip
    plan = make_plan(setting, work, preset["timeout_s"])
    found = experiments(setting, plan)
    runs = run_all(found, setting, preset["repeats"], work, preset["timeout_s"])
    every = [r for rs in runs.values() for r in rs]
    plain = [r for e in found if e.kind == "a" for r in runs[e.name]]
    return {
        "preset": args.preset,
        "setting": setting.to_dict(),
        "repeats": preset["repeats"],
        "environment": env,
        "plan": plan,
        "blocks_per_module": every[0]["blocks_per_module"],
        "module_step_ms": module_steps(plain, setting.modules),
        **summarize(found, runs, threads),
        "run_count": len(every),
        "steady_runs": sum(r["window"] == STEADY for r in every),
    }


def _terminate(signum: int, _frame: Any) -> None:
    """SIGTERM as an exception: the running experiment's processes are stopped on the way out."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        write_outputs(result, markdown(result), args.render.parent, args.render.stem, HERE, NAME)
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scaling-") as scratch:
        work = args.work_dir or Path(scratch)
        result = measure(args, work)
    result["seconds"] = time.perf_counter() - started
    stem = NAME if args.preset == "full" else f"{NAME}_{args.preset}"
    table = markdown(result)
    write_outputs(result, table, args.out, stem, HERE, NAME)
    print(table)
    log.info("wrote %s (%.0f s)", args.out / f"{stem}.md", result["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
