"""Experiment (d): the same stages trained E2E under torch.distributed.pipelining (one rank each).

Launched by torchrun on Gloo. Stage r holds the bodies of pipeline stage r's modules; the
last stage also applies the last module's head, and the schedule applies the CE loss. The
loss is the e2e regime's (vanilla CE with label smoothing): gradients cross stages.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Setting, batches, build, setting_argument, write_json  # noqa: E402

from trgl_dist.network.modules import LocalModule  # noqa: E402
from trgl_dist.training.learner import build_optimizer  # noqa: E402
from trgl_dist.training.stageplan import stage_modules  # noqa: E402

log = logging.getLogger("throughput.gpipe")
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class StageBody(nn.Module):
    """Bodies of consecutive modules; with ``head``, the last module's classifier too."""

    def __init__(self, modules: list[LocalModule], head: nn.Module | None) -> None:
        super().__init__()
        self.bodies = nn.ModuleList(modules)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        for module in self.bodies:
            x, _ = module.features(x)  # type: ignore[operator]
        return self.head(x) if self.head is not None else x


def build_stage(setting: Setting, rank: int, world: int) -> tuple[StageBody, object, object]:
    config, modules, train_set = build(setting, "e2e")
    mine = [modules[k] for k in stage_modules(len(modules), world, rank)]
    body = StageBody(mine, modules[-1].head if rank == world - 1 else None).train()
    return body, config, train_set


def run(setting: Setting, schedule: str, microbatches: int) -> float | None:
    """Train ``setting.steps`` steps; rank 0 returns samples/s after the warm-up."""
    rank, world = dist.get_rank(), dist.get_world_size()
    body, config, train_set = build_stage(setting, rank, world)
    smoothing = config.method.label_smoothing  # type: ignore[attr-defined]

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits, y, label_smoothing=smoothing)

    stage = PipelineStage(body, rank, world, torch.device("cpu"))
    pipe = SCHEDULES[schedule](stage, microbatches, loss_fn=loss_fn)
    optimizer = build_optimizer(body.parameters(), config)  # type: ignore[arg-type]
    started = 0.0
    for index, (x, y) in enumerate(batches(config, train_set)):  # type: ignore[arg-type]
        if index == setting.warmup:
            dist.barrier()
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            pipe.step(x)
        elif rank == world - 1:
            pipe.step(target=y, losses=[])
        else:
            pipe.step()
        optimizer.step()
        if index + 1 >= setting.steps:
            break
    dist.barrier()
    seconds = time.perf_counter() - started
    timed = (setting.steps - setting.warmup) * setting.batch_size
    return timed / seconds if rank == 0 else None


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__)
    setting_argument(parser)
    parser.add_argument("--runs", required=True, help="schedule:microbatches,... e.g. gpipe:4")
    parser.add_argument("--out", type=Path, required=True, help="JSON result file (rank 0)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    is_first = dist.get_rank() == 0
    results = []
    try:
        for item in args.runs.split(","):
            schedule, microbatches = item.split(":")
            rate = run(args.setting, schedule, int(microbatches))
            if rate is not None:
                log.info("%s x%s: %.1f samples/s", schedule, microbatches, rate)
            results.append(
                {"schedule": schedule, "microbatches": int(microbatches), "samples_per_s": rate}
            )
    finally:
        dist.destroy_process_group()
    if is_first:
        write_json(args.out, {"runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
