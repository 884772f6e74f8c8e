"""Where a pipeline stage's time goes: CPU per thread, page faults and py-spy, against co-run.

Runs the K=2 pipeline of the quick preset (`--quick`: resnet-small) or of the full one
(ResNet-110), equal-time split, and the co-run baseline of the same stages (standalone.py:
one process per stage, all computing at once). Over one steady window of each it measures,
per process:
- CPU seconds of every thread (`/proc/PID/task/TID/stat` utime+stime, named by py-spy's
  thread names and `comm`), its run-queue wait (`schedstat`) and context switches (`status`),
  minor page faults; for the pipeline also the metrics coordinator and the torchrun agent;
- a py-spy sample (`py-spy record --threads --format raw --nonblocking`) summarized as the
  share of each thread's samples in the modules' compute, the stage loop, the link threads'
  Python (hand-off and buffers, wire encode/decode, Gloo calls), metrics, data loading.
Per-step figures divide by the steps the stage made in the window (pipeline: its rate
between its own stage records around the window; co-run: its mean step).
Writes results/profile[_quick].json and .md, and the README's block between its markers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1]), str(HERE.parent)]

import psutil  # noqa: E402
import standalone  # noqa: E402
from common import Setting, measure_and_write  # noqa: E402
from run import PRESETS, equal_time_counts  # noqa: E402
from tables import environment_info, load_line  # noqa: E402

import launch  # noqa: E402
from trgl_dist.metrics.records import StageRecord, decode  # noqa: E402
from trgl_dist.rundir import METRICS_FILE  # noqa: E402

log = logging.getLogger("throughput.profile")
RESULTS = HERE / "results"
WINDOW_S = {"quick": 10.0, "full": 30.0}
RATE_HZ = 100
CLK_TCK = os.sysconf("SC_CLK_TCK")
LEAD_S = 8.0  # seconds of pipeline steps beyond the window: the records before and after it
TIMEOUT_S = 900.0
CATEGORIES = ("compute", "stage loop", "hand-off/buffers", "wire encode/decode", "Gloo call",
              "link other", "metrics", "data loading", "watchdog", "harness", "other")  # fmt: skip

# ---------------------------------------------------------------- /proc


def _stat_fields(text: str) -> tuple[str, list[str]]:
    """(comm, the fields after it) of a /proc stat line; field n is fields[n - 3]."""
    left, right = text.index("("), text.rindex(")")
    return text[left + 1 : right], text[right + 2 :].split()


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def thread_stats(pid: int) -> dict[int, dict[str, Any]]:
    """Per live thread: comm, CPU seconds, run-queue wait, faults, context switches."""
    out: dict[int, dict[str, Any]] = {}
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return out
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        stat = _read(f"{base}/stat")
        if stat is None:
            continue
        comm, fields = _stat_fields(stat)
        entry: dict[str, Any] = {
            "comm": comm,
            "cpu_s": (int(fields[11]) + int(fields[12])) / CLK_TCK,
            "minflt": int(fields[7]),
            "majflt": int(fields[9]),
        }
        schedstat = _read(f"{base}/schedstat")
        if schedstat:
            run_ns, wait_ns, _slices = (int(v) for v in schedstat.split()[:3])
            entry["run_s"], entry["runq_wait_s"] = run_ns / 1e9, wait_ns / 1e9
        status = _read(f"{base}/status") or ""
        for key, name in (("voluntary_ctxt_switches", "vcsw"),
                          ("nonvoluntary_ctxt_switches", "ivcsw")):  # fmt: skip
            match = re.search(rf"^{key}:\s+(\d+)", status, re.M)
            if match:
                entry[name] = int(match.group(1))
        out[tid] = entry
    return out


def process_stats(pid: int) -> dict[str, Any]:
    """Whole process (its exited threads included): CPU seconds and minor faults."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return {}
    _comm, fields = _stat_fields(stat)
    return {"cpu_s": (int(fields[11]) + int(fields[12])) / CLK_TCK, "minflt": int(fields[7])}


def snapshot(pids: list[int]) -> dict[str, Any]:
    return {
        "t": time.monotonic(),
        "processes": {pid: {"process": process_stats(pid), "threads": thread_stats(pid)}
                      for pid in pids},  # fmt: skip
    }


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if k in before and k != "comm"}


# ---------------------------------------------------------------- py-spy


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by native thread id, from ``py-spy dump``."""
    done = subprocess.run(["py-spy", "dump", "--pid", str(pid), "--nonblocking"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    names = {}
    for match in re.finditer(r'^Thread (\d+) \([^)]*\): "(.*)"', done.stdout, re.M):
        names[int(match.group(1))] = match.group(2)
    return names


def start_pyspy(pid: int, seconds: float, rate: int, out: Path) -> subprocess.Popen:
    command = ["py-spy", "record", "--pid", str(pid), "--threads", "--format", "raw",
               "--nonblocking", "--rate", str(rate), "--duration", str(max(1, round(seconds))),
               "--output", str(out)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


_FRAME = re.compile(r"^(.*) \((.*)\)$")
_METRICS_FUNCS = ("_maybe_record", "_record_train", "totals", "_flush_eval", "_epoch_done",
                  "_finish")  # fmt: skip
# The loop a thread spends its life in: (file suffix, function suffix) -> what its own code
# (not what it calls) counts as.
_LOOPS = (
    ("training/stage.py", "StageWorker.run", "stage loop"),
    ("runtime/link.py", "._loop", "link other"),
    ("runtime/watchdog.py", "Watchdog.run", "watchdog"),
    ("standalone.py", "_window", "harness"),
)


def _split(frame: str) -> tuple[str, str]:
    """(function, file) of a py-spy frame ``function (file:line)``."""
    match = _FRAME.match(frame)
    func, where = (match.group(1), match.group(2)) if match else (frame, "")
    return func, where.rsplit(":", 1)[0].replace("\\", "/")


def _under(path: str, folder: str) -> bool:
    """``path`` (py-spy shortens it to start at a sys.path entry) is in ``folder``."""
    return path.startswith(folder) or f"/{folder}" in path


def _ends(path: str, *names: str) -> bool:
    return any(path == name or path.endswith(f"/{name}") for name in names)


def _decides(func: str, path: str) -> str | None:
    """The category a frame below a thread's loop settles, if any."""
    if _under(path, "trgl_dist/metrics/") or (
        _ends(path, "training/stage.py") and func.endswith(_METRICS_FUNCS)
    ):
        return "metrics"
    if _ends(path, "training/learner.py", "trgl_dist/method.py") or (
        _under(path, "trgl_dist/network/") or func.endswith("score_batch")
    ):
        return "compute"
    if _ends(path, "trgl_dist/data.py") or _under(path, "torch/utils/data/") or (
        func.endswith(("batch_stream", "_timed"))
    ):
        return "data loading"
    if _ends(path, "runtime/wire.py"):
        return "wire encode/decode"
    if _under(path, "torch/distributed/"):
        return "Gloo call"
    if _ends(path, "runtime/watchdog.py"):
        return "watchdog"
    if _under(path, "trgl_dist/runtime/") and not _ends(path, "runtime/link.py", "planes.py"):
        return "hand-off/buffers"  # buffers, streams, the stage's wiring and routing
    if func.endswith("inbox_stream"):
        return "hand-off/buffers"
    return None


def category(frames: list[str]) -> str:
    """What a sample (frames root to leaf, ``function (file:line)``) is doing. Below the
    deepest loop frame (the stage loop, a link thread's loop, the watchdog, the co-run
    harness) the first frame that decides names it (learner code: compute, the buffers:
    hand-off, ...); a sample in the loop's own code takes the loop's name."""
    parsed = [_split(f) for f in frames]
    loop, start = "other", 0
    for i, (func, path) in enumerate(parsed):
        for suffix, name, what in _LOOPS:
            if _ends(path, suffix) and func.endswith(name):
                loop, start = what, i + 1
    if loop == "other":
        return "other"
    for func, path in parsed[start:]:
        decided = _decides(func, path)
        if decided is not None:
            return decided
    return loop


def read_pyspy(path: Path) -> dict[int, dict[str, Any]]:
    """{tid: {"name", "samples", "categories": {category: samples}}} of a raw py-spy file."""
    out: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        match = re.match(r"thread \((\d+)\): ?(.*)", frames[0])
        if not match:
            continue
        tid = int(match.group(1))
        entry = out.setdefault(tid, {"name": match.group(2), "samples": 0, "categories": {}})
        cat = category(frames[1:])
        entry["samples"] += int(count)
        entry["categories"][cat] = entry["categories"].get(cat, 0) + int(count)
    return out


# ---------------------------------------------------------------- one process's window


def thread_group(name: str, comm: str, is_main: bool) -> str:
    if is_main or name == "MainThread":
        return "main (compute)"
    if name.startswith(("receiver<-", "sender->")) or name == "trgl-watchdog":
        return name
    if comm.startswith(("gloo", "pt_gloo")):
        return "Gloo threads"
    if comm.startswith("ZMQ"):
        return "ZMQ threads"
    return "other threads"


def window_numbers(
    pid: int,
    before: dict[str, Any],
    after: dict[str, Any],
    names: dict[int, str],
    pyspy: dict[int, dict[str, Any]],
    steps: float,
) -> dict[str, Any]:
    """One process over the window: threads, groups, faults, py-spy, all also per step."""
    b, a = before["processes"][pid], after["processes"][pid]
    threads, groups = [], {}
    for tid, now in sorted(a["threads"].items()):
        if tid not in b["threads"]:
            continue
        d = _delta(now, b["threads"][tid])
        name = names.get(tid) or pyspy.get(tid, {}).get("name") or now["comm"]
        group = thread_group(name, now["comm"], tid == pid)
        threads.append({"tid": tid, "name": name, "comm": now["comm"], "group": group, **d})
        groups[group] = groups.get(group, 0.0) + d["cpu_s"]
    process = _delta(a["process"], b["process"])
    main = next(t for t in threads if t["tid"] == pid)
    shares = {}
    for tid, entry in pyspy.items():
        total = entry["samples"]
        key = thread_group(names.get(tid, entry["name"]), "", tid == pid)
        if key in ("other threads",):
            key = entry["name"] or str(tid)
        fractions = {c: n / total for c, n in entry["categories"].items()}
        shares[key] = {"samples": total, "shares": fractions}
    per = 1e3 / steps
    return {
        "pid": pid,
        "steps": steps,
        "seconds": after["t"] - before["t"],
        "threads": threads,
        "cpu_ms_per_step": {g: s * per for g, s in sorted(groups.items())},
        "process_cpu_ms_per_step": process.get("cpu_s", 0.0) * per,
        "minflt_per_step": process.get("minflt", 0.0) / steps,
        "main": {
            "cpu_ms_per_step": main["cpu_s"] * per,
            "runq_wait_ms_per_step": main.get("runq_wait_s", 0.0) * per,
            "vcsw_per_step": main.get("vcsw", 0) / steps,
            "ivcsw_per_step": main.get("ivcsw", 0) / steps,
            "minflt_per_step": main["minflt"] / steps,
        },
        "pyspy": shares,
    }


# ---------------------------------------------------------------- co-run baseline


def profile_corun(setting: Setting, window: float, rate: int, tmp: Path) -> dict[str, Any]:
    """Both stages' standalone jobs at once (standalone.py), measured over one window."""
    config = standalone.Config("profile", setting.modules, asdict(setting))
    server = standalone.Server([config], setting.modules, 1, tmp / "corun", TIMEOUT_S)
    try:
        slots = server.launch(0)
        slots.start()
        pids = slots.pids()
        names = {pid: thread_names(pid) for pid in pids}
        windows = [{"config": config.name, "kind": "corun", "stages": list(range(config.stages))}]
        planned = slots.plan(windows, window)[0]
        time.sleep(max(planned["start"] - time.time(), 0.0))
        before = snapshot(pids)
        spies = {pid: start_pyspy(pid, window, rate, tmp / f"corun-{pid}.raw") for pid in pids}
        spy_procs = [psutil.Process(p.pid) for p in spies.values()]
        time.sleep(max(planned["end"] - time.time(), 0.0))
        after = snapshot(pids)
        spy_cpu = _cpu_of(spy_procs)
        _wait_spies(spies)
        outputs = slots.finish()
        server.wait()
    finally:
        server.stop()
    stages = []
    for slot, pid in enumerate(pids):
        timed = outputs[slot][0]["timed_s"]
        mean = statistics.fmean(timed)
        steps = (after["t"] - before["t"]) / mean
        numbers = window_numbers(pid, before, after, names[pid], read_pyspy(
            tmp / f"corun-{pid}.raw"), steps)  # fmt: skip
        numbers.update({"stage": slot, "step_ms": 1e3 * mean, "timed_steps": len(timed)})
        stages.append(numbers)
    return {"stages": stages, "pyspy_cpu_s": spy_cpu}


def _cpu_of(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def _wait_spies(spies: dict[int, subprocess.Popen]) -> None:
    for pid, spy in spies.items():
        try:
            _, err = spy.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if spy.returncode != 0:
            log.warning("py-spy on %d exited %s: %s", pid, spy.returncode, (err or "")[-500:])


# ---------------------------------------------------------------- the pipeline


class RecordTail:
    """The run's stage records as they arrive, with the monotonic time each was seen."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.seen: list[tuple[float, StageRecord]] = []

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break
                self.offset = f.tell()
                with contextlib.suppress(ValueError):
                    rec = decode(json.loads(line), versionless=True)
                    if type(rec) is StageRecord:
                        self.seen.append((time.monotonic(), rec))

    def stages_started(self, stages: int) -> bool:
        return {r.stage for _, r in self.seen if r.samples > 0} >= set(range(stages))

    def recorded_after(self, t: float, stages: int, total: int) -> bool:
        """Every stage has a record seen after ``t``, written while it still trained."""
        late = {r.stage for seen, r in self.seen if seen >= t and r.samples < total}
        return late >= set(range(stages))


def _stop(proc: subprocess.Popen, coordinator: psutil.Process | None) -> None:
    """End the run early: SIGTERM to torchrun (it stops its workers), then the coordinator
    (its own session) if it outlives them; SIGKILL for what does not stop in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if coordinator is not None:
        with contextlib.suppress(psutil.Error):
            coordinator.wait(timeout=30)
        with contextlib.suppress(psutil.Error):
            coordinator.kill()


def _ranks(launcher: psutil.Process, world: int) -> dict[int, psutil.Process]:
    """The rank processes (RANK in their environment, trgl_dist.train in their command)."""
    found = {}
    for child in launcher.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            rank = child.environ().get("RANK")
            if rank is not None and "trgl_dist.train" in " ".join(child.cmdline()):
                found[int(rank)] = child
    return found if len(found) == world else {}


def _coordinator(launcher: psutil.Process) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "trgl_dist.metrics.coordinator" in " ".join(child.cmdline()):
                return child
    return None


def _elapsed(rec: StageRecord) -> float:
    return rec.samples / rec.samples_per_s if rec.samples_per_s > 0 else 0.0


def profile_pipeline(setting: Setting, window: float, rate: int, tmp: Path) -> dict[str, Any]:
    """The real CLI under torchrun; one window once every stage has sent a record."""
    run_dir = tmp / "pipeline"
    command = [*launch.torchrun(setting.modules), "-m", "trgl_dist.train", *setting.flags(),
               "--out", str(run_dir)]  # fmt: skip
    log.info("$ %s", " ".join(command))
    output = tmp / "pipeline.txt"
    with open(output, "w") as out:
        proc = subprocess.Popen(command, cwd=launch.REPO, env=launch.child_environment(1),
                                stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        return _profile_run(proc, setting, run_dir, window, rate, tmp)
    except BaseException:
        log.warning("pipeline output:\n%s", output.read_text()[-3000:])
        raise
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _profile_run(
    proc: subprocess.Popen, setting: Setting, run_dir: Path, window: float, rate: int, tmp: Path
) -> dict[str, Any]:
    launcher = psutil.Process(proc.pid)
    tail = RecordTail(run_dir / METRICS_FILE)
    deadline = time.monotonic() + TIMEOUT_S
    ranks: dict[int, psutil.Process] = {}
    while not (ranks and tail.stages_started(setting.modules)):
        if proc.poll() is not None:
            raise RuntimeError(f"the pipeline ended (exit {proc.returncode}) before the window")
        if time.monotonic() > deadline:
            raise TimeoutError("the pipeline did not start")
        ranks = ranks or _ranks(launcher, setting.modules)
        tail.poll()
        time.sleep(0.02)
    coordinator = _coordinator(launcher)
    pids = [ranks[r].pid for r in sorted(ranks)]
    others = {"coordinator": coordinator.pid if coordinator else None, "agent": launcher.pid}
    names = {pid: thread_names(pid) for pid in pids}
    watched = pids + [p for p in others.values() if p]
    before = snapshot(watched)
    spies = {pid: start_pyspy(pid, window, rate, tmp / f"rank-{pid}.raw") for pid in pids}
    spy_procs = [psutil.Process(p.pid) for p in spies.values()]
    end = before["t"] + window
    while time.monotonic() < end:
        tail.poll()
        time.sleep(0.02)
    after = snapshot(watched)
    spy_cpu = _cpu_of(spy_procs)
    _wait_spies(spies)
    total = setting.steps * setting.batch_size  # samples once training has ended
    while not tail.recorded_after(after["t"], setting.modules, total) and proc.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError("no stage record after the window")
        tail.poll()
        time.sleep(0.02)
    tail.poll()
    _stop(proc, coordinator)  # the rest of the run is not needed
    records = tail.seen
    ranks_out = []
    for stage, pid in enumerate(pids):
        steps, busy_ms, how = _window_steps(records, stage, before["t"], after["t"],
                                            setting.batch_size, total)  # fmt: skip
        numbers = window_numbers(pid, before, after, names[pid], read_pyspy(
            tmp / f"rank-{pid}.raw"), steps)  # fmt: skip
        numbers.update({"stage": stage, "busy_ms_per_step": busy_ms, "steps_from": how})
        ranks_out.append(numbers)
    steps = ranks_out[-1]["steps"]
    extra = {}
    for role, pid in others.items():
        if pid is None:
            continue
        cpu = after["processes"][pid]["process"].get("cpu_s", 0.0) - before["processes"][pid][
            "process"].get("cpu_s", 0.0)  # fmt: skip
        extra[role] = {"pid": pid, "cpu_s": cpu, "cpu_ms_per_step": 1e3 * cpu / steps}
    return {"ranks": ranks_out, **extra, "pyspy_cpu_s": spy_cpu, "pipeline_steps": setting.steps}


def _window_steps(
    seen: list[tuple[float, StageRecord]], stage: int, t0: float, t1: float, batch: int,
    total: int,
) -> tuple[float, float, str]:
    """Steps the stage made in [t0, t1] (its rate between its own records around the
    window, both written while it trained) and its busy ms per step there."""
    mine = [(t, r) for t, r in seen if r.stage == stage and 0 < r.samples < total]
    first = [r for t, r in mine if t <= t0]
    last = [r for t, r in mine if t >= t1]
    if not first or not last:
        raise RuntimeError(
            f"stage {stage}: no stage record before and after the window: the run was too "
            "short (raise LEAD_S) or the window too long"
        )
    a, b = first[-1], last[0]
    steps = (b.samples - a.samples) / batch
    rate = steps / (_elapsed(b) - _elapsed(a))
    busy_ms = 1e3 * (b.busy_s - a.busy_s) / steps
    return rate * (t1 - t0), busy_ms, f"records at steps {a.step} and {b.step}"


# ---------------------------------------------------------------- tables


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def cpu_table(result: dict[str, Any]) -> list[str]:
    pipe, corun = result["pipeline"]["ranks"], result["corun"]["stages"]
    columns = []
    for p, c in zip(pipe, corun):
        columns += [(f"stage {p['stage']} in-run", p), (f"stage {c['stage']} co-run", c)]
    def order(group: str) -> tuple[bool, bool, str]:
        return group != "main (compute)", group.startswith(("Gloo", "ZMQ", "other")), group

    groups = sorted({g for _, n in columns for g in n["cpu_ms_per_step"]}, key=order)
    rows = []
    for group in groups:
        rows.append([f"CPU ms/step: {group}",
                     *(_f(n["cpu_ms_per_step"].get(group), 2) for _, n in columns)])  # fmt: skip
    rows.append(["CPU ms/step: whole process", *(_f(n["process_cpu_ms_per_step"], 2)
                                                 for _, n in columns)])  # fmt: skip
    step_ms = [n.get("busy_ms_per_step", n.get("step_ms")) for _, n in columns]
    rows.append(["step ms (in-run: busy over the stage's records; co-run: mean step)",
                 *(_f(ms, 2) for ms in step_ms)])  # fmt: skip
    for key, label, digits in (
        ("runq_wait_ms_per_step", "main thread run-queue wait ms/step", 2),
        ("ivcsw_per_step", "main thread involuntary switches/step", 2),
        ("vcsw_per_step", "main thread voluntary switches/step", 2),
        ("minflt_per_step", "main thread minor faults/step", 0),
    ):
        rows.append([label, *(_f(n["main"][key], digits) for _, n in columns)])
    rows.append(["minor faults/step (process)", *(_f(n["minflt_per_step"], 0)
                                                  for _, n in columns)])  # fmt: skip
    rows.append(["steps in the window", *(_f(n["steps"], 0) for _, n in columns)])
    return _table(["per step of the stage", *(name for name, _ in columns)], rows)


def pyspy_table(result: dict[str, Any]) -> list[str]:
    """Share of each thread's samples by category (the categories no sample fell in left
    out)."""
    entries = [(f"stage {n['stage']} {role}", thread, s)
               for role, processes in (("in-run", result["pipeline"]["ranks"]),
                                       ("co-run", result["corun"]["stages"]))
               for n in processes for thread, s in sorted(n["pyspy"].items())]  # fmt: skip
    used = [c for c in CATEGORIES if any(s["shares"].get(c) for _, _, s in entries)]
    rows = [[process, thread, s["samples"], *(_f(100 * s["shares"].get(c, 0.0)) for c in used)]
            for process, thread, s in entries]  # fmt: skip
    return _table(["process", "thread", "samples", *(f"% {c}" for c in used)], rows)


def markdown(result: dict[str, Any]) -> str:
    s, env, pipe = result["setting"], result["environment"], result["pipeline"]
    steps = pipe["ranks"][-1]["steps"]
    lines = [
        f"### Profile ({result['preset']}, K=2)",
        "",
        f"Model {s['model']} (width {s['width'] or 'default'}), batch {s['batch_size']}, "
        f"split {result['split_counts']}, {pipe['pipeline_steps']} pipeline steps; window "
        f"{result['window_s']:.0f} s once every stage had sent its first record; py-spy at "
        f"{result['rate_hz']} Hz on every measured process (its own CPU, "
        f"{result['pipeline']['pyspy_cpu_s']:.1f} s in-run and "
        f"{result['corun']['pyspy_cpu_s']:.1f} s co-run, is on the same 2 cores). "
        f"Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']}. Command: "
        f"`{env['command']}`.{load_line(result.get('machine_load'))}",
        "",
        "CPU per step of each thread over the window (/proc utime+stime, 10 ms ticks), next to "
        "the same stage's standalone co-run job:",
        "",
        *cpu_table(result),
    ]
    for role in ("coordinator", "agent"):
        if role in pipe:
            name = "metrics coordinator process" if role == "coordinator" else "torchrun agent"
            lines.append(f"- {name}: {pipe[role]['cpu_s']:.2f} CPU s in the window, "
                         f"{pipe[role]['cpu_ms_per_step']:.2f} ms per step of the last stage "
                         f"({steps:.0f} steps)")  # fmt: skip
    lines += [
        "",
        "py-spy: share of each thread's (non-idle) samples by what the stack is doing "
        "(compute: ModuleLearner/method/network code and the torch calls under it; stage "
        "loop: StageWorker outside the trainer; hand-off/buffers: the inbox/outbox and hand-off "
        "code; Gloo call: time inside torch.distributed send/recv; harness: the co-run job's "
        "own loop):",
        "",
        *pyspy_table(result),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    base = Setting(model=preset["model"], width=preset["width"], modules=2,
                   batch_size=preset["batch_size"], steps=preset["pipeline_steps"],
                   warmup=preset["warmup"])  # fmt: skip
    counts = args.split_counts or equal_time_counts(base, (2,))["counts"]["2"]
    setting = dataclasses.replace(base, split_counts=tuple(counts))
    window = args.window or WINDOW_S[args.preset]
    result: dict[str, Any] = {
        "preset": args.preset, "setting": asdict(setting), "split_counts": list(counts),
        "window_s": window, "rate_hz": args.rate, "environment": environment_info(args.command),
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="profile-") as name:
        tmp = Path(name)
        log.info("co-run baseline, %.0f s window", window)
        result["corun"] = profile_corun(setting, window, args.rate, tmp)
        slowest = max(s["step_ms"] for s in result["corun"]["stages"]) / 1e3
        # Twice what the window needs at the co-run pace: the run is stopped after it.
        steps = math.ceil(2 * (window + LEAD_S) / slowest)
        log.info("pipeline, %d steps", steps)
        result["pipeline"] = profile_pipeline(
            dataclasses.replace(setting, steps=steps), window, args.rate, tmp
        )
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet-small (default: ResNet-110)")
    parser.add_argument("--window", type=float, default=0.0, help="seconds (0: the preset's)")
    parser.add_argument("--rate", type=int, default=RATE_HZ, help="py-spy samples per second")
    parser.add_argument("--split-counts", type=lambda v: [int(x) for x in v.split(",")],
                        help="blocks per module (default: the equal-time split)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--render", action="store_true", help="only redo the table from JSON")
    args = parser.parse_args(argv)
    if not args.render and shutil.which("py-spy") is None:
        parser.error("py-spy is not installed (pip install py-spy)")
    args.preset = "quick" if args.quick else "full"
    script = "benchmarks/throughput/profile_runtime.py"
    args.command = " ".join(["python", script, *(argv or sys.argv[1:])])
    name = "profile" if args.preset == "full" else f"profile_{args.preset}"
    out = measure_and_write(args, name, run, markdown, HERE / "README.md")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
