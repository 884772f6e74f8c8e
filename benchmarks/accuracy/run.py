"""Accuracy study, version 2: TRGL vs VanGL vs E2E on small Fashion-MNIST training sets.

    python benchmarks/accuracy/run.py --quick          # under 10 minutes on 2 CPU cores
    python benchmarks/accuracy/run.py --work-dir D --publish   # the full study (two hours)
    python benchmarks/accuracy/run.py --smoke --out D  # seconds, synthetic data (the test)

Validation sweeps (lr, tau per train size, multipliers) choose the hyper-parameters; then
every method, train size and seed is trained and scored on the test set. Runs go to a pool
of single-threaded worker processes; each finished run is one line of OUT/runs.jsonl and a
re-run skips what is recorded, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The repo root (trgl_dist without installing it) and benchmarks/ (benchenv).
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]

from experiments import PRESETS, Preset, RunSpec  # noqa: E402
from plan import FINAL_PHASES, Choice, choose, planned  # noqa: E402
from report import PLOT_FILE, embed_in_readme, write_report  # noqa: E402
from runner import Pool, package_version  # noqa: E402

log = logging.getLogger("accuracy")
PUBLISHED = HERE / "results" / "full"
PUBLISHED_FILES = ("runs.jsonl", "results.json", "table.md", PLOT_FILE)


class Study:
    """The run records of one output folder; the last line of an id wins."""

    # A failed final run is tried again by the next invocation; a failed sweep point stays.

    def __init__(self, preset: Preset, out: Path, work_dir: Path) -> None:
        self.preset, self.out, self.work_dir = preset, out, work_dir
        self.path = out / "runs.jsonl"
        self.results: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.results[record["id"]] = record
        for run_id, record in list(self.results.items()):
            if record["status"] != "ok" and record["phase"] in FINAL_PHASES:
                del self.results[run_id]

    def add(self, record: dict[str, Any]) -> None:
        self.results[record["id"]] = record
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")

    def todo(self) -> tuple[Choice, list[RunSpec]]:
        choice = choose(self.preset, self.results)
        return choice, [s for s in planned(self.preset, choice) if s.run_id not in self.results]


def _short(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return record["status"].upper()
    return (
        f"last {100 * record['last_module_accuracy']:.2f}%  best "
        f"{100 * record['best_module_accuracy']:.2f}% (module {record['best_module'] + 1})  "
        f"train {100 * (record['last_train_accuracy'] or 0):.1f}%  {record['seconds']:.0f}s"
    )


def train_all(study: Study, workers: int, threads: int) -> bool:
    """Train every planned run as its hyper-parameters become known; False if interrupted."""
    package = package_version()
    pool = Pool(workers, threads)
    try:
        while True:
            _, todo = study.todo()
            for spec in [s for s in todo if not pool.busy(s.run_id)][: pool.free()]:
                log.info("[%d done] training %s", len(study.results), spec.run_id)
                pool.submit(study.preset, spec, study.work_dir)
            if not pool.running:
                return True
            for record in pool.finished():
                if record["status"] == "interrupted":
                    log.warning("run %s was interrupted: not recorded", record["id"])
                    return False
                study.add({**record, "package": package})
                log.info("    %s -> %s", record["id"], _short(record))
    finally:
        pool.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the 10-minute version")
    mode.add_argument("--smoke", action="store_true", help="tiny synthetic run for tests")
    parser.add_argument("--out", type=Path, help="runs.jsonl and tables (default: results/<mode>)")
    parser.add_argument("--work-dir", type=Path, help="run directories (default: OUT/runs)")
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the tables from OUT/runs.jsonl"
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help=f"full preset, complete study: copy the results to {PUBLISHED.relative_to(HERE)}/"
        " and paste the tables into README.md",
    )
    return parser.parse_args(argv)


def publish(out: Path) -> None:
    """The complete full study becomes the committed results and the README's tables."""
    PUBLISHED.mkdir(parents=True, exist_ok=True)
    if out.resolve() != PUBLISHED.resolve():
        for name in PUBLISHED_FILES:
            shutil.copyfile(out / name, PUBLISHED / name)
    if embed_in_readme(HERE / "README.md", PUBLISHED / "table.md"):
        log.info("README.md now quotes %s", PUBLISHED / "table.md")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    preset = PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    out = args.out or HERE / "results" / preset.name
    out.mkdir(parents=True, exist_ok=True)
    study = Study(preset, out, args.work_dir or out / "runs")
    if not args.report_only and not train_all(study, args.workers, args.threads):
        return 130
    choice, missing = study.todo()
    partial = bool(missing) or not choice.complete(preset)
    if partial:
        log.warning("%d planned runs have no record: the report is PARTIAL", len(missing))
    flags = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = shlex.join(["python", "benchmarks/accuracy/run.py", *flags])
    packages = [r["package"] for r in study.results.values() if r.get("package")]
    info = {
        **choice.to_dict(),
        "package_commits": sorted({p["commit"][:7] for p in packages}),
        "package_changed": any(p["package_changes"] for p in packages),
        "missing_runs": len(missing),
    }
    write_report(out, preset, list(study.results.values()), info, command, partial)
    log.info("wrote %s", out / "table.md")
    if args.publish and preset.name == "full" and not partial:
        publish(out)
    elif args.publish:
        log.warning("not published: only a complete full study replaces the README's tables")
    failed = [r["id"] for r in study.results.values() if r["status"] != "ok"]
    failed = [i for i in failed if study.results[i]["phase"] in FINAL_PHASES]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
