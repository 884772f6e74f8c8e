"""TRGL vs VanGL step time on the same model and K, as a ratio (target <= 1.03).

One process, one thread, warm, the two methods interleaved step by step, median of many
lock-step batches (each module's real ``ModuleLearner.train_step``). Also: the per-op
profile of the difference, and the same comparison with the literal local loss of
``graph_loss.py`` (``W`` in the autograd graph), to show what the package's transport
hooks save. Writes results/overhead.json and results/overhead.md.

    python benchmarks/overhead/run.py            # K = 2, 4, 8, 16 (about 8 minutes)
    python benchmarks/overhead/run.py --quick    # K = 4, fewer steps (under 3 minutes)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))  # the repo root: trgl_dist without installing it
sys.path.insert(2, str(HERE.parent))  # benchenv

import graph_loss  # noqa: E402
from benchenv import environment, write_outputs  # noqa: E402
from op_profile import op_differences, op_times  # noqa: E402
from ratio_tables import report  # noqa: E402
from timing import Setting, compare  # noqa: E402

log = logging.getLogger("overhead.run")
TARGET = 1.03


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="K = 4, 6 timed steps")
    p.add_argument("--model", default="resnet110")
    p.add_argument("--size", type=int, default=32, help="input side (3 x size x size)")
    p.add_argument("--width", type=int, default=0, help="0: the model's default width")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--modules", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=16, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--render", type=Path, help="only rewrite the markdown of this results JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.modules, args.steps, args.warmup = [4], 6, 1
    return args


def run(setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"package": [], "graph": []}
    for k in args.modules:
        results["package"].append(compare(setting, k))
        log.info("K=%d package: %s", k, results["package"][-1])
        results["graph"].append(compare(setting, k, graph_loss.local_loss))
        log.info("K=%d graph: %s", k, results["graph"][-1])
    k = args.modules[0]
    short = replace(setting, steps=args.profile_steps)
    results["profile"] = {
        impl: {"modules": k, "ops": op_differences(op_times(short, k, short.steps, loss))}
        for impl, loss in (("package", None), ("graph", graph_loss.local_loss))
    }
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.render:
        results = json.loads(args.render.read_text())
        write_outputs(
            results, report(results), args.render.parent, args.render.stem, HERE, "overhead"
        )
        return
    started = time.perf_counter()
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
    results["seconds"] = time.perf_counter() - started
    name = "overhead_quick" if args.quick else "overhead"
    write_outputs(results, report(results), args.out, name, HERE, "overhead")
    log.info("wrote %s in %.0f s", args.out / f"{name}.md", results["seconds"])


if __name__ == "__main__":
    main()
