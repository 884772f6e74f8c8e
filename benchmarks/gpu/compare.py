"""Checks 4 to 6, which compare runs: FIFO pipeline = parallel, throughput, memory per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from judge import CPU_ATOL, CPU_RTOL, GPU_ATOL, GPU_RTOL, Outcome
from setting import STAGES, Setting

from trgl_dist.checkpoints import files, manifest
from trgl_dist.errors import CheckpointError


def final_modules(run_dir: Path) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
    """(step, module index -> module state) of the run's last complete checkpoint."""
    found = manifest.latest(run_dir)
    if found is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint")
    step, meta = found
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for index in range(int(meta["modules"])):
        modules[str(index)] = files.load_module(run_dir, step, index)["learner"]["module"]
    return step, modules


def differences(
    a: dict[str, dict[str, torch.Tensor]],
    b: dict[str, dict[str, torch.Tensor]],
    rtol: float,
    atol: float,
) -> tuple[float, int, list[str]]:
    """(largest absolute difference, tensors compared, names outside the tolerance)."""
    if a.keys() != b.keys():
        raise ValueError(f"modules {sorted(a)} against {sorted(b)}")
    largest, count, outside = 0.0, 0, []
    for index in sorted(a, key=int):
        if a[index].keys() != b[index].keys():
            raise ValueError(f"module {index}: the two runs hold different tensors")
        for name, x in a[index].items():
            x, y = x.double(), b[index][name].double()
            largest = max(largest, (x - y).abs().max().item() if x.numel() else 0.0)
            count += 1
            if not torch.allclose(x, y, rtol=rtol, atol=atol):
                outside.append(f"{index}.{name}")
    return largest, count, outside


def fifo_equality(pipeline_dir: Path, parallel_dir: Path, setting: Setting) -> Outcome:
    """The FIFO pipeline's final parameters equal the one-process `parallel` run's."""
    rtol, atol = (CPU_RTOL, CPU_ATOL) if setting.device == "cpu" else (GPU_RTOL, GPU_ATOL)
    rule = f"{setting.device.upper()} tolerance rtol {rtol:g} / atol {atol:g}"
    try:
        step, piped = final_modules(pipeline_dir)
        reference_step, reference = final_modules(parallel_dir)
        largest, count, outside = differences(piped, reference, rtol, atol)
    except (CheckpointError, ValueError) as err:
        return Outcome("fifo-equality", False, str(err))
    numbers = {
        "step": step,
        "reference_step": reference_step,
        "tensors": count,
        "modules": len(piped),
        "max_abs_diff": largest,
        "rtol": rtol,
        "atol": atol,
        "outside_tolerance": outside[:20],
    }
    if step != setting.steps or reference_step != setting.steps:
        why = f"last checkpoints at steps {step} and {reference_step}, expected {setting.steps}"
        return Outcome("fifo-equality", False, why, numbers)
    text = (
        f"max |diff| {largest:.3g} over {count} tensors of {len(piped)} modules at step "
        f"{step} ({rule})"
    )
    if outside:
        text += f"; {len(outside)} tensor(s) outside it, e.g. {', '.join(outside[:3])}"
    return Outcome("fifo-equality", not outside, text, numbers)


def throughput(
    e2e: dict[str, Any] | None, piped: dict[str, Any] | None, setting: Setting
) -> Outcome:
    """samples/s of the pipeline over E2E's; judged only with a GPU per stage."""
    rates = [s.get("samples_per_s") if s else None for s in (piped, e2e)]
    if not all(isinstance(r, float | int) and r > 0 for r in rates):
        return Outcome("throughput", False, f"not measured (pipeline, E2E samples/s: {rates})")
    pipe_rate, e2e_rate = rates
    assert pipe_rate is not None and e2e_rate is not None
    ratio = pipe_rate / e2e_rate
    numbers = {
        "pipeline_samples_per_s": pipe_rate,
        "e2e_samples_per_s": e2e_rate,
        "ratio": ratio,
        "judged": False,
    }
    text = f"pipeline {pipe_rate:.1f} / E2E {e2e_rate:.1f} samples/s = {ratio:.2f}x"
    if setting.device == "cpu":
        return Outcome("throughput", True, f"{text}; CPU run: no speed-up claimed", numbers)
    if setting.gpus < STAGES:
        note = f"; {setting.gpus} GPU(s) for {STAGES} stages: speed-up not judged"
        return Outcome("throughput", True, text + note, numbers)
    numbers["judged"] = True
    if ratio > 1.0:
        return Outcome("throughput", True, f"{text}; a GPU per stage: pipeline faster", numbers)
    return Outcome("throughput", False, f"{text}; a GPU per stage and not faster", numbers)


def memory(e2e: dict[str, Any] | None, piped: dict[str, Any] | None, setting: Setting) -> Outcome:
    """Every pipeline stage's peak below E2E's (CUDA allocator on GPU, tensor account on CPU)."""
    key = "cuda_peak_mb" if setting.device == "cuda" else "peak_tensor_mb"
    if not e2e or not piped or not e2e["stages"] or len(piped["stages"]) != STAGES:
        return Outcome("memory", False, "E2E or pipeline summary missing")
    reference = e2e["stages"][0][key]
    stages = [s[key] for s in piped["stages"]]
    numbers = {"key": key, "e2e_mb": reference, "stages_mb": stages}
    if reference is None or None in stages:
        return Outcome("memory", False, f"{key} missing: E2E {reference}, stages {stages}", numbers)
    shown = ", ".join(f"{v:.2f}" for v in stages)
    text = f"{key}: stages {shown} MB against E2E {reference:.2f} MB"
    above = [i for i, v in enumerate(stages) if v >= reference]
    if above:
        return Outcome("memory", False, f"{text}; stage(s) {above} not below E2E", numbers)
    return Outcome("memory", True, f"{text} (largest {max(stages) / reference:.0%})", numbers)
