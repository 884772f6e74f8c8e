"""A real CPU training run in a fresh process: peak RSS growth over the model-free baseline.

Run by ``run.py`` once per regime (``ru_maxrss`` is a per-process high-water mark). Prints
one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # trgl_dist without installing it

from experiments import Setting, block_counts  # noqa: E402
from tracker import MIB  # noqa: E402

from trgl_dist.learner import ModuleLearner, build_optimizer, taus  # noqa: E402
from trgl_dist.method import local_loss  # noqa: E402
from trgl_dist.models import build_backbone  # noqa: E402
from trgl_dist.modules import build_modules  # noqa: E402

log = logging.getLogger("memory.rss_probe")


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
    baseline = psutil.Process().memory_info().rss
    learners = build_learners(setting, args.modules)
    run_steps(setting, learners, args.regime, args.steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result = {
        "regime": args.regime,
        "modules": args.modules,
        "steps": args.steps,
        "baseline_rss_mib": baseline / MIB,
        "peak_rss_mib": peak / MIB,
        "growth_mib": (peak - baseline) / MIB,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
