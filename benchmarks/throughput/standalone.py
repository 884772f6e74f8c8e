"""Each stage's standalone step, alone and co-run: one process per stage, started together.

A launch (one "repeat") makes one fresh process per stage slot (as many as the largest K).
Each builds the model of every configuration (K, split) in which it has a stage, computes
that stage's input (the earlier modules' output on the run's first batch, as the pipeline
gives it), sets one thread, and warms up. The parent then lays out windows on the shared
clock: per configuration, one window per stage in which only that stage computes ("alone";
the other processes sleep) and one in which all K stages compute at once ("co-run": the
pipeline's process count on the same cores). In a window a process steps back to back from
shortly before its start to past its end, so the others are busy all through it; the steps
that begin and end inside the window are timed. A step is timed as the pipeline's busy time
is: the stage's trainer (its modules' ModuleLearner.train_step) on the batch; around it,
untimed, the input is a fresh copy and the output is held as the outbox would hold it (see
``_stage_step``), and malloc keeps freed memory (``keep_freed_memory``), so that page
faults do not come and go with the allocator's history. A stage's time in one repeat is the
mean of its timed steps (the in-pipeline figure is a mean too). Window order alternates
between repeats.

The slot processes are forked, one fresh set per repeat when the parent asks for it, by a
server process that imported torch once (a torch import costs seconds on a busy 2-core
machine); the server runs no torch operation itself, so a fork inherits no thread pool, and
between repeats it only sleeps, so the parent can time something else meanwhile (run.py
runs the pipelines between repeats). Run as a script, this file is that server; ``Session`` (and
``SlotLaunch`` for the profiler) is the parent's side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
log = logging.getLogger("throughput.standalone")
WARMUP_STEPS = 3
POLL_S = 0.01
START_DELAY_S = 0.5  # from writing the schedule to the first window: every slot has read it
MIN_LEAD_S = 0.05
IDLE_POLL_S = 0.5  # the server between repeats: rare wake-ups, nothing else timed is disturbed
LAUNCH_FILE = "launch.json"


@dataclass(frozen=True)
class Config:
    """One pipeline configuration: its name, number of stages and the run's setting (JSON)."""

    name: str
    stages: int
    setting: dict[str, Any]


# ---------------------------------------------------------------- a slot (forked child)


def _stage_step(config: Config, slot: int) -> Any:
    """The training step of stage ``slot`` of ``config`` on its real input, as a closure
    returning (wall-clock start, seconds) of the timed part: the stage's trainer alone.

    Around it, untimed, the tensors live as in the pipeline: each step takes a fresh copy of
    the input (the loader's batch on stage 0, the receiver's buffer on the others) and, but
    on the last stage, its output stays referenced until two newer ones exist (the outbox
    holds two batches).
    """
    import collections

    import torch
    from common import Setting, batches, build

    from trgl_dist.training.learner import build_learners, chain
    from trgl_dist.training.stageplan import stage_modules

    setting = Setting.from_json(json.dumps(config.setting))
    cfg, modules, train_set = build(setting, "parallel")
    mine = list(stage_modules(len(modules), config.stages, slot))
    learners = build_learners(cfg, modules, mine)
    x, y = next(batches(cfg, train_set))
    with torch.no_grad():  # this stage's input: the earlier modules' output
        h = x
        for module in modules[: mine[0]]:
            h, _ = module.features(h)
    train = chain(learners)
    outbox: collections.deque = collections.deque(maxlen=0 if slot == config.stages - 1 else 2)

    def step() -> tuple[float, float]:
        fresh = h.clone()
        began, t0 = time.time(), time.perf_counter()
        out = train(fresh, y)
        seconds = time.perf_counter() - t0
        outbox.append(out)
        return began, seconds

    return step


def _wait_for(path: Path, timeout: float, poll: float = POLL_S) -> Any:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path.name} after {timeout:.0f} s")
        time.sleep(poll)
    return json.loads(path.read_text())


def _write_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _window(step: Any, start: float, end: float, lead: float) -> dict[str, Any]:
    """Step back to back from ``start - lead`` until past ``end`` (wall clock); the durations
    of the steps that began at or after ``start`` and ended by ``end``."""
    delay = start - lead - time.time()
    if delay > 0:
        time.sleep(delay)
    timed: list[float] = []
    done = 0
    while time.time() < end:
        began, seconds = step()
        done += 1
        if began >= start and began + seconds <= end:
            timed.append(seconds)
    return {"timed_s": timed, "steps": done}


def slot(configs: list[Config], index: int, folder: Path, timeout: float) -> None:
    """One slot: build, warm up, say ready (with an estimate of each step), follow the plan."""
    import torch

    from trgl_dist.runtime.allocator import keep_freed_memory  # as the pipeline's ranks do

    torch.set_num_threads(1)
    kept = keep_freed_memory()
    steps, estimate = {}, {}
    for config in configs:
        if index >= config.stages:
            continue
        step = _stage_step(config, index)
        times = []
        for _ in range(WARMUP_STEPS):
            times.append(step()[1])
        # The least disturbed one: the other slots may still be building meanwhile.
        estimate[config.name] = min(times)
        steps[config.name] = step
    ready = {"pid": os.getpid(), "step_s": estimate, "keep_freed_memory": kept}
    _write_atomic(folder / f"ready-{index}.json", ready)
    plan = _wait_for(folder / "go.json", timeout)
    results = []
    for number, window in enumerate(plan["windows"]):
        if index not in window["stages"]:
            continue
        lead = max(MIN_LEAD_S, 1.5 * estimate[window["config"]])
        timed = _window(steps[window["config"]], window["start"], window["end"], lead)
        results.append({"window": number, **timed})
    _write_atomic(folder / f"out-{index}.json", results)


def _fork_slot(configs: list[Config], index: int, folder: Path, timeout: float) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:  # the child: its output to its own log, and never back into the server's code
        fd = os.open(folder / f"log-{index}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        slot(configs, index, folder, timeout)
    except BaseException:  # noqa: BLE001 - reported through the log and the exit code
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown in a forked child
    return 0  # unreachable


def server(args: argparse.Namespace) -> int:
    """Import once; per repeat, fork the slots into ``sync/r<n>/`` and wait for them."""
    sys.path.insert(0, str(HERE))
    import common  # noqa: F401 - torch and trgl_dist, imported before forking
    import torch  # noqa: F401

    import trgl_dist.training.learner  # noqa: F401
    import trgl_dist.training.stage  # noqa: F401

    configs = [Config(**c) for c in json.loads(args.configs)]
    for repeat in range(args.repeats):
        folder = args.sync / f"r{repeat}"
        # Fork only when the parent asks: between repeats it may be timing something else
        # (the pipeline runs), which slots building their models would slow down.
        _wait_for(folder / LAUNCH_FILE, args.timeout, poll=IDLE_POLL_S)
        pids = [_fork_slot(configs, s, folder, args.timeout) for s in range(args.slots)]
        failed = 0
        for index, pid in enumerate(pids):
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                (folder / f"failed-{index}").write_text(str(code))
                failed += 1
        if failed:
            return 1
    return 0


# ---------------------------------------------------------------- the parent's side


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


class Server:
    """The forking server for ``repeats`` launches of ``slots`` processes."""

    def __init__(
        self, configs: list[Config], slots: int, repeats: int, folder: Path, timeout: float
    ) -> None:
        self.folder, self.slots, self.timeout = folder, slots, timeout
        payload = json.dumps([asdict(c) for c in configs])
        command = [sys.executable, str(Path(__file__)), "--configs", payload,
                   "--sync", str(folder), "--slots", str(slots), "--repeats", str(repeats),
                   "--timeout", str(timeout)]  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "server.txt", "w") as out:
            # Its own process group, which its forked slots join: stop() ends them all.
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=_environment(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def launch(self, repeat: int) -> SlotLaunch:
        """Ask the server to fork the slots of ``repeat`` (0, 1, ... in order)."""
        folder = self.folder / f"r{repeat}"
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / LAUNCH_FILE, {"repeat": repeat})
        return SlotLaunch(self, folder)

    def check(self, folder: Path) -> None:
        """Raise with the log of a slot that failed, or of the server if it died."""
        for index in range(self.slots):
            if (folder / f"failed-{index}").exists():
                self.stop()
                text = (folder / f"log-{index}.txt").read_text()[-3000:]
                raise RuntimeError(f"standalone slot {index} failed:\n{text}")
        code = self.proc.poll()
        if code not in (None, 0):
            text = (self.folder / "server.txt").read_text()[-3000:]
            raise RuntimeError(f"standalone server exited {code}:\n{text}")

    def stop(self) -> None:
        """End the server and any slot it forked (its process group, made for it)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait(self) -> None:
        try:
            self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError("the standalone server did not finish") from None
        self.check(self.folder)


class SlotLaunch:
    """One launch of the slots: wait until ready, plan the windows, collect the timings."""

    def __init__(self, server: Server, folder: Path) -> None:
        self.server, self.folder = server, folder
        self.ready: dict[int, dict[str, Any]] = {}

    def _wait(self, name: str) -> dict[int, Any]:
        found: dict[int, Any] = {}
        deadline = time.monotonic() + self.server.timeout
        while len(found) < self.server.slots:
            for index in range(self.server.slots):
                path = self.folder / name.format(index)
                if index not in found and path.exists():
                    found[index] = json.loads(path.read_text())
            if len(found) < self.server.slots:
                self.server.check(self.folder)
                if time.monotonic() > deadline:
                    self.server.stop()
                    raise TimeoutError(f"standalone slots: no {name} in {self.server.timeout} s")
                time.sleep(POLL_S)
        return found

    def start(self) -> dict[int, dict[str, Any]]:
        """Wait until every slot has warmed up; {slot: {"pid", "step_s": {config: s}}}."""
        self.ready = self._wait("ready-{}.json")
        return self.ready

    def pids(self) -> list[int]:
        return [self.ready[s]["pid"] for s in sorted(self.ready)]

    def step_estimate(self, config: str, stages: list[int]) -> float:
        return max(self.ready[s]["step_s"][config] for s in stages)

    def plan(
        self, windows: list[dict[str, Any]], seconds: float, min_steps: int = 0
    ) -> list[dict[str, Any]]:
        """Give each window ({"config", "kind", "stages"}) ``seconds`` on the shared clock
        (more if needed for ``min_steps`` of its slowest stage, counting the cores its
        processes share), separated by enough time for the slowest step to end and the next
        ones to lead in; tell the slots. Returns the windows with their "start" and "end"."""
        t = time.time() + START_DELAY_S
        planned = []
        previous = 0.0
        cores = os.cpu_count() or 1
        for window in windows:
            step = self.step_estimate(window["config"], window["stages"])
            step *= max(1.0, len(window["stages"]) / cores)
            length = max(seconds, min_steps * step)
            # The previous window's last step may run past its end (longer under contention).
            t += 2.5 * previous + max(MIN_LEAD_S, 1.5 * step) + 0.05
            planned.append({**window, "start": t, "end": t + length})
            t += length
            previous = step
        _write_atomic(self.folder / "go.json", {"windows": planned})
        return planned

    def finish(self) -> dict[int, list[dict[str, Any]]]:
        """Wait for every slot's timings; {slot: its windows' timings}."""
        return self._wait("out-{}.json")


def windows_of(configs: list[Config], repeat: int) -> list[dict[str, Any]]:
    """Per configuration: each stage alone, and all together; the order alternates."""
    windows = []
    for config in configs:
        stages = list(range(config.stages))
        alone = [{"config": config.name, "kind": "alone", "stages": [s]} for s in stages]
        corun = [{"config": config.name, "kind": "corun", "stages": stages}]
        windows += alone + corun if repeat % 2 == 0 else corun + alone[::-1]
    return windows


def summary(values: list[float]) -> dict[str, Any]:
    """Median over repeats with its spread."""
    return {
        "median_s": statistics.median(values),
        "min_s": min(values),
        "max_s": max(values),
        "repeats_s": values,
    }


class Session:
    """Standalone repeats that the caller may interleave with other measurements: each
    ``repeat`` forks fresh slots, times every configuration's windows and returns
    {config: {"alone": [mean s per stage], "corun": [...]}} with the timed step counts."""

    def __init__(self, configs: list[Config], repeats: int, timeout: float, folder: Path):
        self.configs, self.repeats = configs, repeats
        self.slots = max(c.stages for c in configs)
        self.server = Server(configs, self.slots, repeats, folder, timeout)
        self.done = 0

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None and self.done == self.repeats:
                self.server.wait()
        finally:
            self.server.stop()

    def repeat(
        self, window_s: float, min_steps: int = 0
    ) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[int]]]]:
        """The next repeat (window order alternates with its number): per configuration and
        kind, each stage's mean step and its number of timed steps."""
        number, began = self.done, time.monotonic()
        launch = self.server.launch(number)
        launch.start()
        ready = time.monotonic() - began
        planned = launch.plan(windows_of(self.configs, number), window_s, min_steps)
        outputs = launch.finish()
        log.info("standalone repeat %d/%d: %d processes ready in %.1f s, %d windows in %.1f s",
                 number + 1, self.repeats, self.slots, ready, len(planned),
                 time.monotonic() - began - ready)  # fmt: skip
        self.done += 1
        means: dict[tuple[str, str, int], list[float]] = {}
        counts: dict[tuple[str, str, int], list[int]] = {}
        _collect(outputs, planned, window_s, means, counts)
        per_stage = {
            c.name: {k: [means[(c.name, k, s)][0] for s in range(c.stages)] for k in KINDS}
            for c in self.configs
        }
        steps = {
            c.name: {k: [counts[(c.name, k, s)][0] for s in range(c.stages)] for k in KINDS}
            for c in self.configs
        }
        return per_stage, steps


KINDS = ("alone", "corun")


def combine(
    repeats: list[tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[int]]]]],
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Repeats of ``Session.repeat`` as {config: {kind: [per stage: ``summary`` of the
    per-repeat means, with the timed step counts]}}."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, kinds in repeats[0][0].items():
        out[name] = {
            kind: [
                {**summary([r[0][name][kind][s] for r in repeats]),
                 "steps": [r[1][name][kind][s] for r in repeats]}
                for s in range(len(stages))
            ]
            for kind, stages in kinds.items()
        }  # fmt: skip
    return out


def _collect(
    outputs: dict[int, list[dict[str, Any]]],
    planned: list[dict[str, Any]],
    window_s: float,
    means: dict[tuple[str, str, int], list[float]],
    counts: dict[tuple[str, str, int], list[int]],
) -> None:
    for index, results in outputs.items():
        for result in results:
            window = planned[result["window"]]
            timed = result["timed_s"]
            if not timed:
                raise RuntimeError(
                    f"{window['config']} {window['kind']} stage {index}: no step fitted in "
                    f"its {window['end'] - window['start']:.2f} s window"
                )
            key = (window["config"], window["kind"], index)
            means.setdefault(key, []).append(statistics.fmean(timed))
            counts.setdefault(key, []).append(len(timed))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", required=True, help="JSON list of Config")
    parser.add_argument("--sync", type=Path, required=True, help="folder shared with the parent")
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0)
    return server(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
