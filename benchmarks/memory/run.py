"""Peak memory per device against E2E: lock-step regime and pipeline stages, K x split x method.

Estimated with MemTracker under fake tensors (no compute), then checked against the real
peak RSS of a small CPU run. Writes results/memory.json and results/memory.md.

    python benchmarks/memory/run.py            # the full grid (about 6 minutes)
    python benchmarks/memory/run.py --quick    # under 3 minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# This folder, the repo root (trgl_dist without installing it) and benchmarks/ (benchenv).
sys.path[:0] = [str(HERE), str(HERE.parents[1]), str(HERE.parent)]

import cuda_peak  # noqa: E402
from benchenv import environment, run_script, script_parser  # noqa: E402
from experiments import TRGL_GRAPH, Setting, measure_config, measure_e2e  # noqa: E402
from memory_tables import report  # noqa: E402

log = logging.getLogger("memory.run")
PROBE_TIMEOUT_S = 600
#: glibc serves allocations above its mmap threshold with mmap and unmaps them on free. By
#: default that threshold grows to 32 MiB after the first large free, so activations end up
#: in the heap, whose freed pages stay resident: peak RSS then overstates the live tensors.
#: Pinning the threshold at 128 KiB makes RSS follow the live tensors.
ALLOCATORS: dict[str, dict[str, str]] = {
    "glibc default": {},
    "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__, HERE, size=96, quick="K = 4, 16, equal-depth TRGL, one batch")
    p.add_argument("--splits", nargs="+", default=["equal-depth", "equal-memory"])
    p.add_argument(
        "--methods",
        nargs="+",
        default=["vanilla", "trgl", TRGL_GRAPH],
        help=f"{TRGL_GRAPH}: TRGL with W in the autograd graph "
        "(trgl_dist.method.literal_local_loss)",
    )
    p.add_argument("--breakdown-modules", type=int, nargs="+", default=[2, 4, 16])
    p.add_argument("--check-model", default="resnet110", help="model of the real RSS run")
    p.add_argument("--check-size", type=int, default=32)
    p.add_argument("--check-width", type=int, default=0)
    p.add_argument("--check-modules", type=int, default=4)
    p.add_argument("--check-batches", type=int, nargs="+", default=[32, 64])
    p.add_argument("--check-steps", type=int, default=2)
    p.add_argument("--no-check", action="store_true", help="skip the real RSS check")
    args = p.parse_args(argv)
    if args.quick:
        args.modules, args.splits, args.methods = [4, 16], ["equal-depth"], ["trgl"]
        args.check_batches, args.check_steps = [64], 2
    return args


def run_grid(setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
    e2e = {str(k): measure_e2e(setting, k) for k in args.modules}
    configs = []
    for k in args.modules:
        for split in args.splits:
            for method in args.methods:
                config = measure_config(setting, k, split, method)
                config["breakdown"] = method != "vanilla" and k in args.breakdown_modules
                if cuda_peak.available():  # the real allocator peak next to the estimate
                    config["cuda"] = cuda_peak.measure(setting, k, split, method)
                configs.append(config)
    return {"e2e": e2e, "configs": configs}


def probe(
    setting: Setting, modules: int, regime: str, steps: int, allocator: str
) -> dict[str, Any]:
    """One real run in a fresh process (its own peak RSS), under ``ALLOCATORS[allocator]``."""
    command = [
        sys.executable,
        str(HERE / "rss_probe.py"),
        "--setting",
        json.dumps(setting.to_dict()),
        "--modules",
        str(modules),
        "--regime",
        regime,
        "--steps",
        str(steps),
    ]
    env = {**os.environ, **ALLOCATORS[allocator]}
    done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"rss probe failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def estimator_check(args: argparse.Namespace) -> dict[str, Any]:
    """Real peak RSS growth vs the MemTracker peak, lock-step and E2E, per batch size."""
    base = Setting(model=args.check_model, size=args.check_size, width=args.check_width)
    rows = []
    for batch in args.check_batches:
        setting = replace(base, batch_size=batch)
        lock = measure_config(setting, args.check_modules, "equal-depth", "trgl", stages=False)
        estimates = {
            "parallel": lock["lockstep"]["total"],
            "e2e": measure_e2e(setting, args.check_modules)["total"],
        }
        for allocator in ALLOCATORS:
            for regime, estimate in estimates.items():
                real = probe(setting, args.check_modules, regime, args.check_steps, allocator)
                row = {**real, "allocator": allocator, "batch_size": batch}
                rows.append({**row, "estimate_mib": estimate})
                log.info("check: %s", rows[-1])
    return {
        "setting": base.to_dict(),
        "modules": args.check_modules,
        "rows": rows,
        "slopes": slopes(rows),
    }


def slopes(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-sample growth between the smallest and largest batch: constant overheads cancel."""
    out = {}
    for allocator in ALLOCATORS:
        for regime in ("parallel", "e2e"):
            mine = [r for r in rows if r["regime"] == regime and r["allocator"] == allocator]
            mine.sort(key=lambda r: r["batch_size"])
            if len(mine) >= 2:
                out[f"{regime}, {allocator}"] = slope(mine[0], mine[-1])
    return out


def slope(lo: dict[str, Any], hi: dict[str, Any]) -> dict[str, float]:
    span = hi["batch_size"] - lo["batch_size"]
    return {
        "real_mib": (hi["growth_mib"] - lo["growth_mib"]) / span,
        "estimate_mib": (hi["estimate_mib"] - lo["estimate_mib"]) / span,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    setting = Setting(
        model=args.model, size=args.size, width=args.width, batch_size=args.batch_size
    )
    results: dict[str, Any] = {
        "setting": setting.to_dict(),
        "environment": environment("benchmarks/memory/run.py"),
    }
    results.update(run_grid(setting, args))
    if not args.no_check:
        results["estimator"] = estimator_check(args)
    return results


def main(argv: list[str] | None = None) -> None:
    run_script(parse_args(argv), HERE, "memory", measure, report)


if __name__ == "__main__":
    main()
