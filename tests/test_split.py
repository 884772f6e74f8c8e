"""Splits: equal-depth tables, exact balanced partitions, costs, and impossible requests."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import Tensor, nn

from trgl_dist.network.models import Backbone, InputSpec, build_backbone
from trgl_dist.network.split import (
    COST_KINDS,
    FLOAT_BYTES,
    PARAM_COPIES,
    SPLIT_KINDS,
    TimeProfile,
    balanced_partition,
    block_costs,
    equal_depth,
    profile_times,
    saved_activation_bytes,
    split_blocks,
)
from trgl_dist.network.split import SPLIT_KINDS as SPLITS

CIFAR = InputSpec(3, 32, 10)


@pytest.fixture(scope="module")
def resnet110() -> Backbone:
    return build_backbone("resnet110", CIFAR, num_modules=4)


@pytest.mark.parametrize(
    ("num_modules", "counts"),
    [
        (1, [54]),
        (2, [27, 27]),
        (4, [14, 14, 13, 13]),
        (8, [7, 7, 7, 7, 7, 7, 6, 6]),
        (16, [4] * 6 + [3] * 10),
    ],
)
def test_equal_depth_tables_for_resnet110(
    resnet110: Backbone, num_modules: int, counts: list[int]
) -> None:
    assert len(resnet110.blocks) == 54
    assert equal_depth(54, num_modules) == counts
    assert split_blocks("equal-depth", resnet110, CIFAR, num_modules) == counts


def test_impossible_splits_are_one_clear_line(resnet110: Backbone) -> None:
    with pytest.raises(ValueError, match=r"^cannot split 54 blocks of resnet110 into 100 modules$"):
        split_blocks("equal-depth", resnet110, CIFAR, 100)
    with pytest.raises(ValueError, match="into 0 modules"):
        split_blocks("equal-params", resnet110, CIFAR, 0)
    with pytest.raises(ValueError, match="cannot split 3 blocks into 4 modules"):
        equal_depth(3, 4)
    with pytest.raises(ValueError, match="cannot split 2 blocks into 3 modules"):
        balanced_partition([1.0, 2.0], 3)


@pytest.mark.parametrize(
    ("explicit", "message"),
    [
        ([20, 20], "sums to 40, not 54"),
        ([54, 0], "at least one block"),
        ([50, 5, -1], "3 entries for 2 modules"),
    ],
)
def test_bad_explicit_splits(resnet110: Backbone, explicit: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_blocks("equal-depth", resnet110, CIFAR, 2, explicit)


def test_explicit_split_wins(resnet110: Backbone) -> None:
    assert split_blocks("equal-params", resnet110, CIFAR, 3, (50, 3, 1)) == [50, 3, 1]


def test_unknown_split_kind(resnet110: Backbone) -> None:
    with pytest.raises(ValueError, match="equal-depth"):
        split_blocks("equal-mood", resnet110, CIFAR, 2)
    with pytest.raises(ValueError, match="params"):
        block_costs(resnet110, CIFAR, "flops")


@pytest.mark.parametrize(
    ("costs", "num_modules", "counts"),
    [
        ([1, 2, 3, 4, 5], 2, [3, 2]),  # 6 | 9 beats 10 | 5
        ([5, 1, 1, 1, 1, 1], 2, [1, 5]),
        ([1, 1, 1, 1, 10], 2, [4, 1]),
        ([3, 3, 3], 3, [1, 1, 1]),
        ([7, 2, 9], 1, [3]),
        ([2, 2, 2, 2, 2, 2, 2], 3, [3, 2, 2]),  # ties: the most even, earlier groups larger
        ([0.1] * 10, 3, [4, 3, 3]),  # float sums must not break the tie rule
        ([4, 1, 1, 1, 1, 4], 3, [1, 4, 1]),
    ],
)
def test_balanced_partition_by_hand(
    costs: list[float], num_modules: int, counts: list[int]
) -> None:
    assert balanced_partition(costs, num_modules) == counts


def brute_force_min_max(costs: list[float], num_modules: int) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), num_modules - 1):
        bounds = [0, *cuts, len(costs)]
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


def test_balanced_partition_is_optimal_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 9)
        num_modules = rng.randint(1, n)
        costs = [float(rng.randint(1, 20)) for _ in range(n)]
        counts = balanced_partition(costs, num_modules)
        assert len(counts) == num_modules and min(counts) >= 1 and sum(counts) == n
        bounds = list(itertools.accumulate([0, *counts]))
        achieved = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        assert achieved == brute_force_min_max(costs, num_modules)


@pytest.mark.parametrize(("num_blocks", "num_modules"), [(54, 4), (54, 16), (10, 3), (7, 7)])
def test_equal_costs_partition_like_equal_depth(num_blocks: int, num_modules: int) -> None:
    assert balanced_partition([1.0] * num_blocks, num_modules) == equal_depth(
        num_blocks, num_modules
    )


def test_parameter_costs_count_the_stem_into_block_zero(resnet110: Backbone) -> None:
    costs = block_costs(resnet110, CIFAR, "params")
    stem = sum(p.numel() for p in resnet110.stem.parameters())
    per_block = [sum(p.numel() for p in b.parameters()) for b in resnet110.blocks]
    assert costs == [per_block[0] + stem, *per_block[1:]]
    assert stem == 3 * 16 * 9 + 2 * 16  # conv3x3 3->16, BN affine


@pytest.mark.parametrize("num_modules", [2, 4, 8])
def test_equal_params_gives_early_modules_more_blocks(
    resnet110: Backbone, num_modules: int
) -> None:
    counts = split_blocks("equal-params", resnet110, CIFAR, num_modules)
    assert len(counts) == num_modules and sum(counts) == 54 and min(counts) >= 1
    assert counts == sorted(counts, reverse=True)
    assert counts[0] > counts[-1]


class Sine(nn.Module):
    """sin(2x): the multiplication by a constant saves nothing, sin saves its input 2x."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(2 * x)


class SineOfInput(nn.Module):
    """sin(x) saves x itself, which the previous layer already accounts for."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x)


def test_saved_activation_bytes_counts_what_autograd_keeps() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    h, saved = saved_activation_bytes(Sine(), x)
    torch.testing.assert_close(h, torch.sin(2 * x))
    assert saved == 15 * 4
    assert saved_activation_bytes(SineOfInput(), x)[1] == 0
    linear = nn.Linear(5, 2)  # saves its input (excluded) and weight (a parameter)
    assert saved_activation_bytes(linear, x)[1] == 0


def test_memory_costs_scale_with_batch_and_keep_the_model_untouched(
    resnet110: Backbone,
) -> None:
    before = {k: v.clone() for k, v in resnet110.blocks[0].state_dict().items()}
    params = block_costs(resnet110, CIFAR, "params")
    at_0 = block_costs(resnet110, CIFAR, "memory", batch_size=0)
    at_64 = block_costs(resnet110, CIFAR, "memory", batch_size=64)
    at_128 = block_costs(resnet110, CIFAR, "memory", batch_size=128)
    assert at_0 == [p * FLOAT_BYTES * PARAM_COPIES for p in params]
    for zero, single, double in zip(at_0, at_64, at_128):
        assert double - single == pytest.approx(single - zero)
        assert single > zero
    for key, value in resnet110.blocks[0].state_dict().items():
        assert torch.equal(value, before[key]), key  # no running-statistics update
    assert all(block.training for block in resnet110.blocks)


def test_equal_memory_makes_early_modules_shallower() -> None:
    spec = InputSpec(3, 96, 10)
    backbone = build_backbone("resnet110", spec, num_modules=4, width=4)
    counts = split_blocks("equal-memory", backbone, spec, 4)
    assert sum(counts) == 54 and len(counts) == 4
    assert counts[0] < counts[-1]


# --- equal-time: profiled forward+backward time, one head per module ---------------------


def fake_profiler(blocks: list[float], heads: list[float], calls: list | None = None):
    """A profiler returning fixed timings, recording what it was asked for."""

    def profile(backbone: Backbone, spec: InputSpec, batch_size: int, head: str) -> TimeProfile:
        if calls is not None:
            calls.append((len(backbone.blocks), spec, batch_size, head))
        return TimeProfile(list(blocks), list(heads))

    return profile


def test_equal_time_is_a_split_kind() -> None:
    assert "equal-time" in SPLIT_KINDS and "time" in COST_KINDS
    assert set(SPLIT_KINDS) == set(SPLITS)


@pytest.mark.parametrize(
    ("blocks", "heads", "num_modules", "counts"),
    [
        ([1.0] * 6, [0.0] * 6, 2, [3, 3]),  # uniform: equal-depth
        ([1.0] * 54, [0.0] * 54, 4, [14, 14, 13, 13]),
        ([4, 4, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0.0] * 12, 2, [3, 9]),  # costly early blocks
        ([1.0] * 4, [0, 0, 0, 2], 2, [3, 1]),  # the last module's head shortens it
        ([1.0] * 6, [3, 3, 3, 0, 0, 0], 2, [4, 2]),  # a head is charged where the module ends
    ],
)
def test_equal_time_partition_from_injected_timings(
    resnet110: Backbone,
    blocks: list[float],
    heads: list[float],
    num_modules: int,
    counts: list[int],
) -> None:
    backbone = Backbone(resnet110.stem, resnet110.blocks[: len(blocks)], name="resnet110")
    profiler = fake_profiler(blocks, heads)
    assert split_blocks("equal-time", backbone, CIFAR, num_modules, profiler=profiler) == counts


def test_equal_time_module_cost_is_blocks_plus_one_head() -> None:
    rng = random.Random(1)
    for _ in range(40):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        blocks = [float(rng.randint(1, 9)) for _ in range(n)]
        heads = [float(rng.randint(0, 9)) for _ in range(n)]
        counts = balanced_partition(blocks, k, tails=heads)
        bounds = list(itertools.accumulate([0, *counts]))
        achieved = max(sum(blocks[a:b]) + heads[b - 1] for a, b in itertools.pairwise(bounds))
        best = min(
            max(sum(blocks[a:b]) + heads[b - 1] for a, b in itertools.pairwise([0, *cuts, n]))
            for cuts in itertools.combinations(range(1, n), k - 1)
        )
        assert achieved == best


def test_equal_time_passes_batch_size_and_head_to_the_profiler(resnet110: Backbone) -> None:
    calls: list = []
    profiler = fake_profiler([1.0] * 54, [0.0] * 54, calls)
    split_blocks("equal-time", resnet110, CIFAR, 2, batch_size=48, head="mlp", profiler=profiler)
    assert calls == [(54, CIFAR, 48, "mlp")]


def test_explicit_counts_skip_the_profile(resnet110: Backbone) -> None:
    def refuse(*_args: object) -> TimeProfile:
        raise AssertionError("an explicit split must not profile")

    assert split_blocks("equal-time", resnet110, CIFAR, 2, (50, 4), profiler=refuse) == [50, 4]


def test_tail_costs_must_match_the_blocks() -> None:
    with pytest.raises(ValueError, match="2 tail costs for 3 blocks"):
        balanced_partition([1.0, 1.0, 1.0], 2, tails=[0.0, 0.0])


def test_profile_times_shapes_and_leaves_model_rng_and_threads_alone() -> None:
    backbone = build_backbone("resnet-small", CIFAR, num_modules=2, width=4)
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in backbone.blocks]
    threads = torch.get_num_threads()
    rng = torch.random.get_rng_state()
    profile = profile_times(backbone, CIFAR, 4, "1cnn", repeats=1)
    assert len(profile.blocks) == len(profile.heads) == len(backbone.blocks)
    assert all(t > 0 for t in profile.blocks + profile.heads)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert torch.get_num_threads() == threads
    for block, state in zip(backbone.blocks, before):
        for key, value in block.state_dict().items():
            assert torch.equal(value, state[key]), key
    assert len(block_costs(backbone, CIFAR, "time", batch_size=2)) == len(backbone.blocks)
