"""Accuracy study: TRGL vs VanGL vs E2E on Fashion-MNIST, with seeds and 95% intervals.

    python benchmarks/accuracy/run.py --quick          # under 10 minutes on 2 CPU cores
    python benchmarks/accuracy/run.py                  # the full study (about an hour)
    python benchmarks/accuracy/run.py --smoke --out D  # seconds, synthetic data (the test)

Phases: lr sweep and tau sweep on a validation split carved from the training set, then
VanGL/TRGL (parallel regime) and E2E at each train size and seed, the pipeline check,
the same network cut into fewer modules, sequential/multilap, and (full mode) the whole
training set. Each finished run is one line of OUT/runs.jsonl; a re-run skips finished
runs, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
# The repo root (trgl_dist without installing it) and benchmarks/ (benchenv).
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]

from experiments import (  # noqa: E402
    PRESETS,
    Preset,
    RunSpec,
    lr_sweep,
    method_runs,
    module_count_runs,
    pipeline_pair,
    regime_runs,
    tau_sweep,
)
from report import embed_in_readme, write_report  # noqa: E402
from runner import execute, package_version  # noqa: E402
from stats import pick_best  # noqa: E402

log = logging.getLogger("accuracy")


class Study:
    """The run records of one output folder; runs already recorded are not trained again."""

    def __init__(self, preset: Preset, out: Path, work_dir: Path, train: bool = True) -> None:
        self.preset, self.out, self.work_dir, self.train = preset, out, work_dir, train
        self.path = out / "runs.jsonl"
        self.results: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.results[record["id"]] = record
        self.missing: list[str] = []  # planned runs without a record (--report-only)
        # The package this process trains with (imported once, at the start).
        self.package = package_version() if train else None

    def run(self, specs: list[RunSpec]) -> list[dict[str, Any]]:
        records = []
        for spec in specs:
            if spec.run_id not in self.results and not self.train:
                self.missing.append(spec.run_id)
                continue
            if spec.run_id not in self.results:
                log.info("[%d] training %s", len(self.results) + 1, spec.run_id)
                record = {**execute(self.preset, spec, self.work_dir), "package": self.package}
                self.results[spec.run_id] = record
                with open(self.path, "a", encoding="utf-8") as out:
                    out.write(json.dumps(record) + "\n")
                log.info("    -> %s", _short(record))
            records.append(self.results[spec.run_id])
        return records


def _short(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return "FAILED"
    return (
        f"last {100 * record['last_module_accuracy']:.2f}%  best "
        f"{100 * record['best_module_accuracy']:.2f}% (module {record['best_module'] + 1})  "
        f"{record['seconds']:.0f}s"
    )


def choose(study: Study) -> dict[str, Any]:
    """lr of VanGL, lr of E2E, then tau of TRGL at VanGL's lr: best validation last-module."""
    preset = study.preset
    sweep = study.run(lr_sweep(preset))
    key = "last_module_accuracy"
    vanilla = pick_best([r for r in sweep if r["method"] == "vanilla"], key)
    e2e = pick_best([r for r in sweep if r["method"] == "e2e"], key)
    lr = vanilla["lr"] if vanilla else preset.lr_grid[0]
    e2e_lr = e2e["lr"] if e2e else preset.e2e_lr_grid[0]
    trgl = pick_best(study.run(tau_sweep(preset, lr)), key)
    tau = trgl["tau"] if trgl else preset.tau_grid[0]
    chosen = [r["id"] for r in (vanilla, e2e, trgl) if r]
    log.info("chosen on validation: lr %g (VanGL and TRGL), E2E lr %g, tau %g", lr, e2e_lr, tau)
    return {
        "lr": lr,
        "e2e_lr": e2e_lr,
        "tau": tau,
        "criterion": f"validation {key}",
        "validation_size": preset.val_size,
        "sweep_train_size": preset.sweep_size,
        "chosen_ids": chosen,
    }


def run_study(study: Study) -> dict[str, Any]:
    """Every phase in order; with study.train False, only collects what is recorded."""
    preset = study.preset
    choice = choose(study)
    lr, e2e_lr, tau = choice["lr"], choice["e2e_lr"], choice["tau"]
    for size in preset.sizes:
        study.run(method_runs(preset, "main", (size,), preset.seeds, lr, e2e_lr, tau))
        if size == preset.sizes[0]:  # the cheap, required checks before the big sizes
            study.run(pipeline_pair(preset, lr, tau))
            study.run(module_count_runs(preset, lr, tau))
    study.run(regime_runs(preset, lr, tau))
    if preset.fullset_seeds:
        study.run(method_runs(preset, "main", (0,), preset.fullset_seeds, lr, e2e_lr, tau))
    return choice


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the 10-minute version")
    mode.add_argument("--smoke", action="store_true", help="tiny synthetic run for tests")
    parser.add_argument("--out", type=Path, help="results folder (default: results/<mode>)")
    parser.add_argument("--work-dir", type=Path, help="run directories (default: OUT/runs)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: no OpenMP spinning on a shared machine)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild tables and plot from OUT/runs.jsonl, train nothing",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    out = args.out or HERE / "results" / preset.name
    out.mkdir(parents=True, exist_ok=True)
    study = Study(preset, out, args.work_dir or out / "runs", train=not args.report_only)
    flags = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = shlex.join(["python", "benchmarks/accuracy/run.py", *flags])
    choice = run_study(study)
    partial = bool(study.missing)
    if partial:
        log.warning("%d planned runs have no record: the report is PARTIAL", len(study.missing))
    commits = sorted({r["package"]["commit"] for r in study.results.values() if r.get("package")})
    choice = {**choice, "package_commits": commits or "not recorded in runs.jsonl"}
    write_report(out, preset, list(study.results.values()), choice, command, partial)
    log.info("wrote %s", out / "table.md")
    is_committed = preset.name == "full" and out.resolve() == (HERE / "results/full").resolve()
    if is_committed and embed_in_readme(HERE / "README.md", out / "table.md"):
        log.info("README.md now quotes %s", out / "table.md")
    # A sweep point may legitimately diverge; any other failure fails the study.
    failed = [
        r["id"] for r in study.results.values() if r["status"] != "ok" and r["phase"] != "sweep"
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
