"""`python -m trgl_dist.plan`: before a run, the layout of stages and replicas that trains
fastest on the target device, with each stage's predicted step time and peak memory."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence

import torch

from trgl_dist import cli
from trgl_dist.data import input_spec
from trgl_dist.errors import ConfigError, UserError, user_message
from trgl_dist.planning.plan import Plan, machine_for, make_plan, measured_modules, table
from trgl_dist.planning.profile import measure_side_by_side, side_by_side, usable_cores

DESCRIPTION = (
    "Time each module's training step on the device (processes computing side by side, as in "
    "the run; each block first for an equal-time split) and each module's memory (fake "
    "tensors, nothing allocated), then choose the modules per stage and the replicas per "
    "stage of WORLD_SIZE ranks that maximize the predicted samples/s under the memory cap. "
    "Takes the model, data and pipeline flags of trgl_dist.train; run the printed layout "
    "with --plan auto, or with the --stage-modules and --stage-replicas it prints."
)


def _parser() -> cli.argparse.ArgumentParser:
    parser = cli.build_parser("plan", DESCRIPTION)
    own = parser.add_argument_group("planner")
    own.add_argument("--world-size", type=int, required=True, help="Ranks to lay out.")
    own.add_argument("--memory-cap", type=float, help="MiB each rank may use; no cap by default.")
    own.add_argument("--device", help="cpu, cuda or cuda:N to profile on; cuda when there is one.")
    own.add_argument(
        "--cores", type=int, help="CPU cores the ranks share; this process's by default."
    )
    return parser


def plan_for(argv: Sequence[str] | None = None) -> Plan:
    config, extras = cli.parse(argv, _parser())
    config = config.replace("pipeline", plan="auto", stage_modules=(), stage_replicas=())
    world = extras.world_size
    if world < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world}")
    cap = getattr(extras, "memory_cap", None)
    if cap is not None and not cap > 0:
        raise ConfigError(f"--memory-cap must be > 0 MiB, got {cap}")
    device = _device(getattr(extras, "device", None))
    cores = getattr(extras, "cores", None) or usable_cores()
    spec = input_spec(config.data)
    processes = min(side_by_side(world, device), cores)
    logging.info("profiling %s on %s, %d process(es) at once", config.model.name, device,
                 processes)
    counts, seconds = measured_modules(
        config, spec, device, lambda measure: measure_side_by_side(measure, processes)
    )
    return make_plan(config, spec, world, counts, seconds, machine_for(device, cores),
                     cap if cap is not None else math.inf)


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no GPU here")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: the planner knows cpu and cuda")
    return device


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        plan = plan_for(argv)
    except UserError as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    p = plan.prediction
    print(table(plan))
    print(
        "run it: torchrun --nproc_per_node="
        f"{sum(p.replicas)} -m trgl_dist.train ... --stage-modules "
        f"{','.join(map(str, p.stage_modules))} --stage-replicas {','.join(map(str, p.replicas))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
