"""TRGL vs VanGL step time on the same model and K, as a ratio (target <= 1.03).

One process, one thread, warm, the two methods interleaved step by step, median of many
lock-step batches (each module's real ``ModuleLearner.train_step``). Also: the per-op
profile of the difference, and the same comparison with the literal local loss
``trgl_dist.method.literal_local_loss`` (``W`` in the autograd graph), to show what the
package's transport hooks save. Writes results/overhead.json and results/overhead.md.

    python benchmarks/overhead/run.py            # K = 2, 4, 8, 16 (about 8 minutes)
    python benchmarks/overhead/run.py --quick    # K = 4, fewer steps (under 3 minutes)
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# This folder, the repo root (trgl_dist without installing it) and benchmarks/ (benchenv).
sys.path[:0] = [str(HERE), str(HERE.parents[1]), str(HERE.parent)]

from benchenv import environment, run_script, script_parser  # noqa: E402
from op_profile import op_differences, op_times  # noqa: E402
from ratio_tables import report  # noqa: E402
from timing import Setting, compare  # noqa: E402

from trgl_dist.method import literal_local_loss, local_loss  # noqa: E402

log = logging.getLogger("overhead.run")
TARGET = 1.03
#: The results' names of the two implementations of the local loss.
LOSSES = {"package": local_loss, "graph": literal_local_loss}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__, HERE, size=32, quick="K = 4, 6 timed steps")
    p.add_argument("--steps", type=int, default=16, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--profile-steps", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.modules, args.steps, args.warmup = [4], 6, 1
    return args


def run(setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {impl: [] for impl in LOSSES}
    for k in args.modules:
        for impl, loss in LOSSES.items():
            results[impl].append(compare(setting, k, loss))
            log.info("K=%d %s: %s", k, impl, results[impl][-1])
    k = args.modules[0]
    short = replace(setting, steps=args.profile_steps)
    results["profile"] = {
        impl: {"modules": k, "ops": op_differences(op_times(short, k, short.steps, loss))}
        for impl, loss in LOSSES.items()
    }
    return results


def measure(args: argparse.Namespace) -> dict[str, Any]:
    setting = Setting(
        model=args.model,
        size=args.size,
        width=args.width,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
    )
    results: dict[str, Any] = {"setting": setting.to_dict(), "target": TARGET}
    results["environment"] = environment("benchmarks/overhead/run.py", threads=1)
    results.update(run(setting, args))
    return results


def main(argv: list[str] | None = None) -> None:
    run_script(parse_args(argv), HERE, "overhead", measure, report)


if __name__ == "__main__":
    main()
