"""Seven checks of the GPU path (on CPU with Gloo under --cpu); exit 0 only if all pass."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
# This folder, the repo root (trgl_dist without installing it) and benchmarks/ (benchenv).
sys.path[:0] = [str(HERE), str(HERE.parents[1]), str(HERE.parent)]

import children  # noqa: E402
import compare  # noqa: E402
import judge  # noqa: E402
from killed import killed_rank  # noqa: E402
from outputs import RESULTS, machine, probe_gpus, write_results  # noqa: E402
from setting import STEPS, Setting, shown  # noqa: E402

BUDGET_S = 450.0  # every run together: 8 minutes with the set-up and the slack
USAGE = """
  python3 benchmarks/gpu/check.py          # on the GPUs this machine has (1 to 8)
  python3 benchmarks/gpu/check.py --cpu    # the same checks on CPU, Gloo (CI)

Each check prints one line, `PASS <check>: <numbers>` or `FAIL <check>: <why>`, as it
finishes, then `gpu-check: N/M checks passed`. Results go to results/<cpu|cuda>_check.json
and .md (and the README's table); the runs go to a temporary work directory.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, epilog=USAGE, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--cpu", action="store_true", help="run on CPU with Gloo (no GPU needed)")
    p.add_argument(
        "--work-dir",
        type=Path,
        help="where the runs go (default: a fresh temp dir, "
        "removed at the end unless a check failed)",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where the results go")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help=f"--max-steps of the measured runs (0: {STEPS['cuda']} on GPU, {STEPS['cpu']} on CPU)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=BUDGET_S,
        help="seconds for all the runs together; a run past it is killed",
    )
    return p.parse_args(argv)


def command_line(argv: list[str] | None) -> str:
    """The command as typed: launch/gpu-check.sh says so, else this script."""
    given = os.environ.get("TRGL_GPU_CHECK_COMMAND")
    return given or shlex.join(["python3", "benchmarks/gpu/check.py", *(argv or sys.argv[1:])])


def launch(
    name: str, command: list[str], kind: str, setting: Setting, runs: dict[str, Any]
) -> children.Finished:
    """One measured run, under its deadline; its command and outcome go into ``runs``."""
    run = children.run(
        name,
        command,
        log=setting.work / f"{name}.log",
        env=setting.env(),
        cwd=setting.work,
        deadline_s=setting.deadline(kind),
    )
    runs[name] = {"command": shown(command), "seconds": run.seconds, "exit_code": run.code}
    return run


def single(regime: str, setting: Setting, runs: dict[str, Any]) -> tuple[judge.Outcome, Path]:
    """Check 1 or 2: one process, ``--regime REGIME``."""
    out = setting.work / regime
    run = launch(regime, setting.single(regime, out), "single", setting, runs)
    return judge.one_process(regime, run, out, setting), out


def piped(setting: Setting, runs: dict[str, Any]) -> tuple[judge.Outcome, Path]:
    """Check 3: the 4-stage pipeline under torchrun."""
    out = setting.work / "pipeline"
    run = launch("pipeline", setting.torchrun(setting.measured(out)), "pipeline", setting, runs)
    return judge.pipeline(run, out, setting), out


def run_checks(setting: Setting, runs: dict[str, Any]) -> list[judge.Outcome]:
    """The seven checks in order, each line printed as it is decided."""
    outcomes: list[judge.Outcome] = []

    def decided(outcome: judge.Outcome) -> None:
        print(outcome.line(), flush=True)
        outcomes.append(outcome)

    e2e, e2e_dir = single("e2e", setting, runs)
    decided(e2e)
    parallel, parallel_dir = single("parallel", setting, runs)
    decided(parallel)
    pipe, pipe_dir = piped(setting, runs)
    decided(pipe)
    e2e_summary = judge.read_summary(e2e_dir) if e2e.passed else None
    pipe_summary = judge.read_summary(pipe_dir) if pipe.passed else None
    if pipe.passed and parallel.passed:
        decided(compare.fifo_equality(pipe_dir, parallel_dir, setting))
    else:
        decided(judge.Outcome("fifo-equality", False, "the pipeline or parallel run failed"))
    decided(compare.throughput(e2e_summary, pipe_summary, setting))
    decided(compare.memory(e2e_summary, pipe_summary, setting))
    killed = killed_rank(setting)
    runs["killed-rank"] = {key: killed.numbers.get(key) for key in ("command", "exit_code")}
    decided(killed)
    return outcomes


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # through the finally that kills every child


def visible_gpus(device: str) -> dict[str, Any] | None:
    """The GPUs the runs will see; None (said why) when a GPU check finds none."""
    if device == "cpu":
        return {"count": 0, "names": []}
    gpus = probe_gpus(Setting(device, 0, 0, Path.cwd(), 0.0).env())
    if not gpus["count"]:
        why = gpus.get("error", "").strip()[-300:]
        print(
            f"gpu-check: no GPU visible to torch (--cpu runs the checks on CPU) {why}",
            file=sys.stderr,
        )
        return None
    return gpus


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    started = time.monotonic()
    gpus = visible_gpus(device)
    if gpus is None:
        return 2
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = args.steps or STEPS[device]
    setting = Setting(device, gpus["count"], steps, work, args.budget)
    info = machine(device, gpus, command_line(argv))
    print(
        f"gpu-check: {device}, {gpus['count']} GPU(s) {gpus['names']}, {steps} steps, "
        f"runs in {work}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    runs: dict[str, Any] = {}
    try:
        outcomes = run_checks(setting, runs)
    finally:
        children.kill_everything()
    extra = {
        "machine": info,
        "setting": {"flags": list(setting.flags), "steps": steps},
        "runs": runs,
        "seconds": time.monotonic() - started,
    }
    path = write_results(args.results_dir, device, outcomes, extra)
    passed = sum(o.passed for o in outcomes)
    if args.work_dir is None and passed == len(outcomes):
        shutil.rmtree(work, ignore_errors=True)
    elif passed < len(outcomes):
        print(f"gpu-check: the runs' logs are in {work}", flush=True)
    print(f"gpu-check: results in {path} and {path.with_suffix('.md')}", flush=True)
    print(f"gpu-check: {passed}/{len(outcomes)} checks passed", flush=True)
    return 0 if passed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
