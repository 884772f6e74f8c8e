"""Throughput benchmark: E2E, lock-step parallel, our pipeline and torch.distributed.pipelining.

Experiments, all on one model, batch size and number of steps (synthetic data):
  (a) e2e        E2E back-propagation in one process, at each thread count (best reported)
  (b) parallel   the lock-step `parallel` regime in one process
  (c) pipeline   `torchrun -m trgl_dist.train`, one stage per rank, equal-depth and equal-time
  (d) pipelining the same stages E2E under torch.distributed.pipelining (GPipe, 1F1B)
plus each stage's standalone step time, alone and co-run (the efficiency bounds; see
standalone.py), and the equal-time profile. Writes results/<name>.json and results/<name>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# This folder, the repo root (trgl_dist without installing it) and benchmarks/ (benchenv).
sys.path[:0] = [str(HERE), str(HERE.parents[1]), str(HERE.parent)]

import standalone  # noqa: E402
from analysis import combine_runs, pipeline_numbers  # noqa: E402
from common import Setting, config_of, measure_and_write  # noqa: E402
from tables import environment_info, markdown  # noqa: E402

import launch  # noqa: E402
from trgl_dist.data import build_datasets  # noqa: E402
from trgl_dist.network.split import balanced_partition, equal_depth, profile_times  # noqa: E402
from trgl_dist.training.build import backbone_for  # noqa: E402

log = logging.getLogger("throughput")
# steps: per in-process run (a, b) and per (d) schedule. pipeline_steps: per (c) run, for a
# steady window of well over 100 steps between a stage's records (one every ~2 s) at K=2.
# Standalone stage steps: `repeats` launches, each with a window of `window_s` seconds (or
# about `window_steps` steps if longer) per stage alone and one co-run window per (K, split);
# after each launch, one (c) run of every (K, split).
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"model": "resnet110", "width": 0, "batch_size": 32, "steps": 48, "warmup": 3,
             "pipeline_steps": 144, "ks": (2, 4), "microbatches": (1, 2, 4), "threads": (1, 2),
             "repeats": 3, "window_s": 3.0, "window_steps": 10},
    "quick": {"model": "resnet-small", "width": 16, "batch_size": 32, "steps": 24, "warmup": 3,
              "pipeline_steps": 200, "ks": (2, 4), "microbatches": (1, 2), "threads": (1, 2),
              "repeats": 3, "window_s": 1.0, "window_steps": 15},
    "tiny": {"model": "resnet-small", "width": 4, "batch_size": 8, "steps": 4, "warmup": 1,
             "pipeline_steps": 4, "ks": (2,), "microbatches": (1,), "threads": (1,),
             "repeats": 2, "window_s": 0.2, "window_steps": 3},
}  # fmt: skip
RESULTS = HERE / "results"
TIMEOUT_S = 900.0
#: The standalone server waits this long for its next repeat: all pipeline runs in between.
SESSION_TIMEOUT_S = 3600.0
MIN_MICROBATCH = 4


def equal_time_counts(setting: Setting, ks: tuple[int, ...]) -> dict:
    """Profile the blocks once (one thread, at the batch size) and split for every K."""
    config = config_of(setting, "parallel")
    _, _, spec = build_datasets(config.data, config.train.seed)
    backbone = backbone_for(config.replace("model", modules=max(ks)).model, spec)
    profile = profile_times(backbone, spec, setting.batch_size, config.model.head)
    return {
        "block_ms": [1e3 * s for s in profile.blocks],
        "head_ms": [1e3 * s for s in profile.heads],
        "counts": {str(k): balanced_partition(profile.blocks, k, tails=profile.heads) for k in ks},
    }


def best(results: list[dict[str, Any]]) -> dict[str, Any]:
    return max(results, key=lambda r: r["samples_per_s"])


def settings_by_split(base: Setting, k: int, equal_time: list[int]) -> dict[str, Setting]:
    depth = equal_depth(sum(equal_time), k)
    return {
        split: dataclasses.replace(base, modules=k, split_counts=tuple(counts))
        for split, counts in (("equal-depth", depth), ("equal-time", equal_time))
    }


def local_jobs(base: Setting, splits: dict[int, dict[str, Setting]], threads: tuple) -> list:
    """(a) at every thread count and (b) per K."""
    jobs: list[dict[str, Any]] = []
    for t in threads:
        jobs.append({"name": f"e2e/{t}", "mode": "e2e", "threads": t, "setting": asdict(base)})
    for k, by_split in splits.items():
        for t in threads:
            setting = asdict(by_split["equal-depth"])
            jobs.append({"name": f"parallel/{k}/{t}", "mode": "parallel", "threads": t,
                         "setting": setting})  # fmt: skip
    return jobs


def pipeline_setting(setting: Setting, preset: dict[str, Any]) -> Setting:
    """The setting of a (c) run and of its stages' standalone steps: more steps."""
    return dataclasses.replace(setting, steps=preset["pipeline_steps"])


def measure_pipelines(
    splits: dict[int, dict[str, Setting]], preset: dict[str, Any], tmp: Path
) -> dict[str, dict[str, dict[str, Any]]]:
    """(c) for every K and split, each run paired with the standalone repeat just before it.

    Repeat r times every stage alone and co-run, then runs every (K, split) pipeline once:
    in-run / co-run is taken within each repeat, from measurements a few minutes apart,
    because this kind of machine's speed drifts by tens of percent over minutes (the same
    single-thread loop runs from 82 to 136 iterations a second within 40 s); a median over
    the repeats then compares like with like."""
    configs = [
        standalone.Config(f"{k}/{split}", k, asdict(pipeline_setting(setting, preset)))
        for k, by_split in splits.items()
        for split, setting in by_split.items()
    ]
    repeats = preset["repeats"]
    timed = []
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    with standalone.Session(configs, repeats, SESSION_TIMEOUT_S, tmp / "standalone") as session:
        for r in range(repeats):
            timed.append(session.repeat(preset["window_s"], preset["window_steps"]))
            steps = standalone.combine(timed[-1:])
            for k, by_split in splits.items():
                for split, setting in by_split.items():
                    name, stage = f"{k}/{split}", steps[f"{k}/{split}"]
                    run_dir = launch.pipeline(
                        pipeline_setting(setting, preset), tmp / f"c{k}{split}-r{r}", TIMEOUT_S
                    )
                    runs[name].append(pipeline_numbers(
                        run_dir, setting.batch_size, stage["alone"], stage["corun"]
                    ))  # fmt: skip
    overall = standalone.combine(timed)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for k, by_split in splits.items():
        out[str(k)] = {}
        for split, setting in by_split.items():
            name = f"{k}/{split}"
            numbers = combine_runs(runs[name], overall[name]["alone"], overall[name]["corun"],
                                   setting.batch_size)  # fmt: skip
            cores = min(k, os.cpu_count() or 1)
            numbers["cpu_bound_samples_per_s"] = (
                setting.batch_size * cores / sum(numbers["stage_step_s"])
            )
            out[str(k)][split] = numbers
    return out


def measure_k(
    k: int, by_split: dict[str, Setting], local: dict, pipelines: dict, args: argparse.Namespace,
    tmp: Path,
) -> dict[str, Any]:
    """(b) from the in-process results, (c) from the interleaved runs, and (d), launched here."""
    preset = PRESETS[args.preset]
    out: dict[str, Any] = {
        "parallel": [local[f"parallel/{k}/{t}"] for t in preset["threads"]],
        "splits": pipelines[str(k)],
    }
    # Micro-batches per batch: multiples of K (Schedule1F1B needs at least K), each holding
    # at least MIN_MICROBATCH samples (BatchNorm statistics on 2 samples mean little).
    counts = [f * k for f in preset["microbatches"]]
    counts = [m for m in counts if base_batch(by_split) // m >= MIN_MICROBATCH] or counts[:1]
    runs = [(s, m) for s in ("gpipe", "1f1b") for m in counts]
    path = tmp / f"d{k}.json"
    out["pipelining"] = launch.gpipe(by_split["equal-depth"], runs, path, TIMEOUT_S)
    return out


def base_batch(by_split: dict[str, Setting]) -> int:
    return by_split["equal-depth"].batch_size


def ratios(result: dict[str, Any]) -> None:
    """c/a and c/d for every K and split (d: the best schedule and micro-batch count)."""
    a = result["e2e_best"]["samples_per_s"]
    for per_k in result["per_k"].values():
        d = best(per_k["pipelining"])["samples_per_s"]
        per_k["parallel_best"] = best(per_k["parallel"])
        for numbers in per_k["splits"].values():
            numbers["c_over_a"] = numbers["samples_per_s"] / a
            numbers["c_over_d"] = numbers["samples_per_s"] / d


def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    base = Setting(
        model=preset["model"], width=preset["width"], modules=2,
        batch_size=preset["batch_size"], steps=preset["steps"], warmup=preset["warmup"],
    )  # fmt: skip
    result: dict[str, Any] = {"preset": args.preset, "setting": asdict(base)}
    result["method"] = {
        key: preset[key] for key in ("pipeline_steps", "repeats", "window_s", "window_steps")
    }
    result["environment"] = environment_info(args.command)
    result["equal_time"] = equal_time_counts(base, preset["ks"])
    splits = {
        k: settings_by_split(base, k, result["equal_time"]["counts"][str(k)]) for k in preset["ks"]
    }
    with tempfile.TemporaryDirectory(prefix="throughput-") as name:
        tmp = Path(name)
        jobs = local_jobs(base, splits, preset["threads"])
        local = launch.local(jobs, tmp / "local.json", TIMEOUT_S)
        result["e2e"] = [local[f"e2e/{t}"] for t in preset["threads"]]
        result["e2e_best"] = best(result["e2e"])
        pipelines = measure_pipelines(splits, preset, tmp)
        result["per_k"] = {
            str(k): measure_k(k, by_split, local, pipelines, args, tmp)
            for k, by_split in splits.items()
        }
    ratios(result)
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, under 3 minutes")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes, seconds")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--render", action="store_true", help="only redo the tables from JSON")
    args = parser.parse_args(argv)
    args.preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    args.command = " ".join(["python", "benchmarks/throughput/run.py", *(argv or sys.argv[1:])])
    name = "throughput" if args.preset == "full" else f"throughput_{args.preset}"
    out = measure_and_write(args, name, run, markdown, HERE / "README.md")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
