"""A real CPU training run in a fresh process: peak RSS growth over the model-free baseline.

Run by ``run.py`` once per regime and batch. The peak is the kernel's high-water mark of
this process's memory map (``VmHWM``), reset at the baseline through ``clear_refs``.
Not ``getrusage().ru_maxrss``: Linux carries it across fork and exec, so a child reports
at least its parent's peak. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # trgl_dist without installing it
sys.path.insert(2, str(Path(__file__).resolve().parents[1]))  # benchenv

from experiments import Setting, block_counts  # noqa: E402
from tracker import MIB  # noqa: E402

from trgl_dist.method import local_loss  # noqa: E402
from trgl_dist.network.models import build_backbone  # noqa: E402
from trgl_dist.network.modules import build_modules  # noqa: E402
from trgl_dist.training.learner import ModuleLearner, build_optimizer, taus  # noqa: E402

log = logging.getLogger("memory.rss_probe")


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    """Restart the RSS high-water mark from the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def build_learners(setting: Setting, modules: int) -> list[ModuleLearner]:
    config = setting.config(modules, "trgl")
    counts = block_counts(setting, modules, "equal-depth")
    backbone = build_backbone(setting.model, setting.spec, num_modules=modules, width=setting.width)
    mods = build_modules(backbone, counts, setting.spec)
    tau = taus(config, modules)
    return [ModuleLearner(k, m, config, tau[k]) for k, m in enumerate(mods)]


def run_steps(setting: Setting, learners: list[ModuleLearner], regime: str, steps: int) -> None:
    """``steps`` batches of the lock-step regime (the real ``train_step``) or of E2E."""
    s = setting.spec
    if regime == "e2e":
        params = [p for lr in learners for p in lr.module.body.parameters()]
        params += list(learners[-1].module.head.parameters())
        optimizer = build_optimizer(params, learners[0].config)
    for _ in range(steps):
        x = torch.randn(setting.batch_size, s.channels, s.size, s.size)
        y = torch.randint(0, s.num_classes, (setting.batch_size,))
        if regime == "parallel":
            h = x
            for learner in learners:
                h = learner.train_step(h, y)
            continue
        h, residues = x, []
        for learner in learners:
            learner.module.train()
            h, block_residues = learner.module.features(h)
            residues += block_residues
        logits = learners[-1].module.head(h)
        loss = local_loss(logits, y, residues, method="vanilla")
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--setting", required=True, help="Setting as JSON")
    parser.add_argument("--modules", type=int, required=True)
    parser.add_argument("--regime", choices=("parallel", "e2e"), required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    setting = Setting(**json.loads(args.setting))
    torch.manual_seed(0)
    # Warm the allocator and the kernels' code paths on something model-free first.
    torch.randn(4, 4) @ torch.randn(4, 4)
    baseline = status_kib("VmRSS") * 1024
    was_reset = reset_peak()
    learners = build_learners(setting, args.modules)
    run_steps(setting, learners, args.regime, args.steps)
    peak = status_kib("VmHWM") * 1024
    result = {
        "regime": args.regime,
        "modules": args.modules,
        "steps": args.steps,
        "baseline_rss_mib": baseline / MIB,
        "peak_rss_mib": peak / MIB,
        "growth_mib": (peak - baseline) / MIB,
        "peak_reset_at_baseline": was_reset,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
