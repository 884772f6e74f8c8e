"""A real CPU training run in a fresh process: peak RSS growth over the model-free baseline.

Run by ``run.py`` once per regime and batch. The peak is the kernel's high-water mark of
this process's memory map (``VmHWM``), reset at the baseline through ``clear_refs``.
Not ``getrusage().ru_maxrss``: Linux carries it across fork and exec, so a child reports
at least its parent's peak. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# This folder, the repo root (trgl_dist without installing it) and benchmarks/ (benchenv).
sys.path[:0] = [str(HERE), str(HERE.parents[1]), str(HERE.parent)]

from experiments import Setting, block_counts  # noqa: E402
from tracker import MIB, Network, build_in  # noqa: E402

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


def build_network(setting: Setting, modules: int, regime: str) -> Network:
    """TRGL's lock-step learners (``parallel``), or E2E's, with their one shared optimizer."""
    config = setting.config(modules, "trgl").replace("train", regime=regime)
    counts = block_counts(setting, modules, "equal-depth")
    return build_in(contextlib.nullcontext(), config, setting.spec, counts)


def run_steps(setting: Setting, net: Network, steps: int) -> None:
    """``steps`` batches of the lock-step regime (each module's real ``train_step``) or of
    E2E (``end_to_end``)."""
    s = setting.spec
    trainer = net.trainer()
    for _ in range(steps):
        x = torch.randn(setting.batch_size, s.channels, s.size, s.size)
        y = torch.randint(0, s.num_classes, (setting.batch_size,))
        trainer(x, y)


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
    net = build_network(setting, args.modules, args.regime)
    run_steps(setting, net, args.steps)
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
