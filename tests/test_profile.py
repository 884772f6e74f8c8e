"""What the planner measures: each module's real training step, the block profile only for
an equal-time split, side by side in fresh processes."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers import small_config
from trgl_dist.data import input_spec
from trgl_dist.planning import plan, profile


def test_every_module_step_is_timed_once_per_kind_and_the_rng_is_untouched(monkeypatch):
    # resnet-small: stem + 3 blocks at 32x32, then 3 at 16x16, 3 at 8x8; modules of 1 block.
    config = small_config(model={"modules": 9, "split": "equal-depth"})
    spec = input_spec(config.data)
    timed: list[int] = []
    real = profile.median_seconds

    def counting(run, repeats, device):
        timed.append(repeats)
        return real(run, repeats, device)

    monkeypatch.setattr(profile, "median_seconds", counting)
    before = torch.random.get_rng_state()
    seconds = profile.module_steps(config, spec, [1] * 9, "cpu")
    assert torch.equal(before, torch.random.get_rng_state())
    assert len(seconds) == 9 and all(s > 0 for s in seconds)
    # Module 1 holds the stem; 4 and 7 downsample; 2-3, 5-6 and 8-9 each repeat a kind
    # (same input, same layers). So 6 kinds are timed, and alike modules share their time.
    assert len(timed) == 6
    assert seconds[1] == seconds[2] and seconds[4] == seconds[5] and seconds[7] == seconds[8]
    assert torch.get_num_threads() >= 1


def test_the_block_profile_runs_only_for_an_equal_time_split_still_to_be_made(monkeypatch):
    calls: list[str] = []

    def fake_blocks(config, spec, device):
        calls.append("blocks")
        return [5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0] + [0.1] * 9

    def fake_modules(config, spec, counts, device):
        calls.append("modules")
        return [float(c) for c in counts]

    monkeypatch.setattr(plan, "block_profile", fake_blocks)
    monkeypatch.setattr(plan, "module_steps", fake_modules)
    here = functools.partial(plan.measured_modules, device=torch.device("cpu"),
                             measure=lambda measure: measure())  # fmt: skip
    depth = small_config(model={"modules": 3, "split": "equal-depth"})
    assert here(depth, input_spec(depth.data)) == ((3, 3, 3), [3.0, 3.0, 3.0])
    assert calls == ["modules"]
    calls.clear()
    timed = small_config(model={"modules": 3, "split": "equal-time"})
    counts, seconds = here(timed, input_spec(timed.data))
    assert calls == ["blocks", "modules"]
    assert counts == (1, 4, 4)  # the heavy first block alone in module 1
    assert seconds == [1.0, 4.0, 4.0]
    calls.clear()
    given = small_config(model={"modules": 3, "split": "equal-time", "split_counts": (2, 3, 4)})
    assert here(given, input_spec(given.data))[0] == (2, 3, 4)
    assert calls == ["modules"]


def _twice(scale: float) -> list[float]:
    return [scale, 2 * scale]


def test_processes_side_by_side_give_the_mean_of_their_measurements():
    assert profile.measure_side_by_side(functools.partial(_twice, 1.5), 2) == pytest.approx(
        [1.5, 3.0]
    )
