"""Checks 1 to 3 (e2e, parallel, pipeline), judged from exit codes, logs and summary.json."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from children import Finished
from setting import STAGES, Setting

#: fifo-equality on CPU: the test suite's own tolerance (tests/test_pipeline.py).
CPU_RTOL, CPU_ATOL = 1e-5, 1e-6
#: fifo-equality on GPU: cuDNN may choose nondeterministic algorithms (atomics in the
#: backward of convolutions), so two runs of the same steps differ from the first step on in
#: the last bits, and SGD carries that on: |diff| <= 1e-3 + 1e-3 |value| (README).
GPU_RTOL, GPU_ATOL = 1e-3, 1e-3
_ONE_PROCESS_DEVICE = re.compile(r"(?:e2e|parallel): .* on (\S+), \d+ training samples")
# "[stage 1 (rank 1)] joined 4 ranks on cuda:1; ..." (one rank per stage: no replica).
_STAGE_DEVICE = re.compile(r"\[stage (\d+) \(rank \d+\)\] joined \d+ ranks on (\S+);")
_SHARED = re.compile(r"ranks (\d+) and (\d+) share (\S+):")
_ERROR_LINE = re.compile(r"^(?:\[rank\d+\]: )?(\w+(?:Error|Exception)\b.*)$", re.MULTILINE)


@dataclass
class Outcome:
    """One check's verdict, its line's text and its numbers for the results file."""

    check: str
    passed: bool
    text: str  # the numbers (PASS) or why it failed (FAIL)
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def line(self) -> str:
        return f"{self.status} {self.check}: {self.text}"


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def summary_of(run: Finished, out: Path) -> dict[str, Any] | None:
    """The run's summary.json, if it exited 0."""
    return read_summary(out) if run.ok else None


def peak_text(stage: dict[str, Any], device: str) -> str:
    if device == "cuda":
        return f"CUDA peak {stage['cuda_peak_mb']:.1f} MB"
    return f"peak tensors {stage['peak_tensor_mb']:.2f} MB, peak RSS {stage['peak_rss_mb']:.0f} MB"


def log_note(run: Finished, numbers: dict[str, Any]) -> str:
    """A passing run may still have printed tracebacks: counted, and said on its line."""
    output = run.output()
    tracebacks = output.count("Traceback (most recent call last)")
    numbers["log_tracebacks"] = tracebacks
    if not tracebacks:
        return ""
    ignored = output.count("Exception ignored in")
    errors = sorted(set(_ERROR_LINE.findall(output)))
    numbers["log_errors"] = errors
    first = f": {errors[0][:120]}" if errors else ""
    return f"; its log holds {tracebacks} traceback(s) ({ignored} ignored){first}"


def one_process(name: str, run: Finished, out: Path, setting: Setting) -> Outcome:
    """e2e or parallel: exit 0, summary.json with one stage, on the expected device."""
    summary = summary_of(run, out)
    if summary is None:
        return Outcome(name, False, run.why() if not run.ok else "no summary.json")
    found = _ONE_PROCESS_DEVICE.search(run.output())
    device = found.group(1) if found else "?"
    stage = summary["stages"][0] if len(summary["stages"]) == 1 else None
    numbers = {
        "samples_per_s": summary["samples_per_s"],
        "seconds": run.seconds,
        "device": device,
        "stage": stage,
    }
    if device.split(":")[0] != setting.device:
        return Outcome(name, False, f"ran on {device}, expected {setting.device}", numbers)
    if stage is None or (setting.device == "cuda" and stage["cuda_peak_mb"] is None):
        return Outcome(name, False, "summary.json has no stage memory figures", numbers)
    text = (
        f"{summary['samples_per_s']:.1f} samples/s, {peak_text(stage, setting.device)} "
        f"({setting.steps} steps on {device}, {run.seconds:.0f} s)"
    )
    return Outcome(name, True, text + log_note(run, numbers), numbers)


def expected_devices(setting: Setting) -> list[str]:
    """Rank r on cuda:(r mod GPUs), as the package maps them; CPU otherwise."""
    if setting.device == "cpu":
        return ["cpu"] * STAGES
    return [f"cuda:{r % setting.gpus}" for r in range(STAGES)]


def pipeline(run: Finished, out: Path, setting: Setting) -> Outcome:
    """4 stages: exit 0, summary.json lists them, each rank on its GPU, and shared GPUs
    (only the links whose two ends share one) announced as going through host memory."""
    summary = summary_of(run, out)
    if summary is None:
        return Outcome("pipeline", False, run.why() if not run.ok else "no summary.json")
    log = run.output()
    devices = {int(r): d for r, d in _STAGE_DEVICE.findall(log)}
    shared = sorted(f"{a}->{b}" for a, b, _ in _SHARED.findall(log))
    want = expected_devices(setting)
    want_shared = [f"{r}->{r + 1}" for r in range(STAGES - 1) if want[r] == want[r + 1]]
    if setting.device == "cpu":
        want_shared = []  # no GPU: nothing to share
    stages = [s["stage"] for s in summary["stages"]]
    numbers = {
        "stages": stages,
        "devices": [devices.get(r) for r in range(STAGES)],
        "gpus": setting.gpus,
        "links_via_host": shared,
        "samples_per_s": summary["samples_per_s"],
        "seconds": run.seconds,
    }
    if stages != list(range(STAGES)):
        return Outcome("pipeline", False, f"summary.json lists stages {stages}", numbers)
    if [devices.get(r) for r in range(STAGES)] != want:
        return Outcome("pipeline", False, f"stages ran on {devices}, expected {want}", numbers)
    if shared != want_shared:
        return Outcome(
            "pipeline", False, f"links via host {shared}, expected {want_shared}", numbers
        )
    if setting.device == "cpu":
        where, links = "CPU", "every link over Gloo"
    else:
        nccl = [f"{r}->{r + 1}" for r in range(STAGES - 1) if f"{r}->{r + 1}" not in shared]
        where = f"{setting.gpus} GPU(s)"
        links = f"links over NCCL: {', '.join(nccl) or 'none'}; through pinned host memory: "
        links += ", ".join(shared) or "none"
    text = (
        f"{STAGES} stages on {where} ({', '.join(want)}), {links}; "
        f"{summary['samples_per_s']:.1f} samples/s, {run.seconds:.0f} s"
    )
    return Outcome("pipeline", True, text + log_note(run, numbers), numbers)
