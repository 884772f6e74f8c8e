"""How a backbone's blocks are divided into K consecutive modules.

``equal-depth`` divides the block count as evenly as possible; ``equal-params`` and
``equal-memory`` balance a per-block cost with an exact contiguous partition. An
explicit list of block counts always wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from trgl_dist.models import Backbone, Block, InputSpec

SPLIT_KINDS = ("equal-depth", "equal-params", "equal-memory")
COST_KINDS = ("params", "memory")
#: Bytes per float32 element.
FLOAT_BYTES = 4
#: Copies of each parameter held while training: the weight, its gradient and up to two
#: optimizer buffers (SGD momentum uses one, Adam/AdamW two). An upper bound for SGD.
PARAM_COPIES = 4
#: Batch of the forward pass that measures activations; bytes scale linearly from it.
PROBE_BATCH = 2
#: Relative tolerance under which two partition costs count as equal (float sums).
TIE_TOLERANCE = 1e-9


def equal_depth(num_blocks: int, num_modules: int) -> list[int]:
    """Blocks per module as even as possible; the earlier modules take the remainder."""
    check_feasible(num_blocks, num_modules)
    base, extra = divmod(num_blocks, num_modules)
    return [base + 1 if k < extra else base for k in range(num_modules)]


def check_feasible(num_blocks: int, num_modules: int, model: str = "") -> None:
    if num_modules < 1 or num_modules > num_blocks:
        of_model = f" of {model}" if model else ""
        raise ValueError(f"cannot split {num_blocks} blocks{of_model} into {num_modules} modules")


def is_within(value: float, bound: float) -> bool:
    return value <= bound + TIE_TOLERANCE * max(abs(bound), 1.0)


def min_max_group_sum(prefix: Sequence[float], num_modules: int) -> float:
    """The smallest achievable largest group sum (exact DP over contiguous splits)."""
    n = len(prefix) - 1
    inf = float("inf")
    # best[k][i]: smallest max group sum splitting the first i costs into k groups.
    best = [[inf] * (n + 1) for _ in range(num_modules + 1)]
    best[0][0] = 0.0
    for k in range(1, num_modules + 1):
        for i in range(k, n - num_modules + k + 1):
            best[k][i] = min(max(best[k - 1][j], prefix[i] - prefix[j]) for j in range(k - 1, i))
    return best[num_modules][n]


def balanced_partition(costs: Sequence[float], num_modules: int) -> list[int]:
    """Contiguous partition of ``costs`` into K non-empty groups; returns block counts.

    First minimizes the largest group sum. Among the optimal partitions, it then prefers
    the most even one (smallest sum of squared group sums), then the one whose earlier
    groups hold more blocks, so equal costs give exactly :func:`equal_depth`.
    """
    n = len(costs)
    check_feasible(n, num_modules)
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + float(cost))
    bound = min_max_group_sum(prefix, num_modules)
    # rest[k][i]: smallest sum of squares splitting costs[i:] into k groups within bound.
    rest = [[float("inf")] * (n + 1) for _ in range(num_modules + 1)]
    rest[0][n] = 0.0
    for k in range(1, num_modules + 1):
        for i in range(n - k, -1, -1):
            rest[k][i] = min_sum_of_squares(prefix, rest[k - 1], bound, i, n - k + 1)
    return largest_first_counts(prefix, rest, bound, num_modules)


def min_sum_of_squares(
    prefix: Sequence[float], rest_after: list[float], bound: float, start: int, last_end: int
) -> float:
    """Best (group sum squared + rest) over groups costs[start:end], end <= last_end."""
    candidates = (
        (prefix[end] - prefix[start]) ** 2 + rest_after[end]
        for end in range(start + 1, last_end + 1)
        if is_within(prefix[end] - prefix[start], bound)
    )
    return min(candidates, default=float("inf"))


def largest_first_counts(
    prefix: Sequence[float], rest: list[list[float]], bound: float, num_modules: int
) -> list[int]:
    """Rebuild the optimal partition, giving each group as many blocks as it can take."""
    n = len(prefix) - 1
    counts: list[int] = []
    i = 0
    for k in range(num_modules, 0, -1):
        target = rest[k][i]
        for j in range(n - k + 1, i, -1):  # largest group first: deterministic tie-break
            group = prefix[j] - prefix[i]
            if is_within(group, bound) and is_within(group**2 + rest[k - 1][j], target):
                counts.append(j - i)
                i = j
                break
    return counts


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def saved_activation_bytes(block: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """Run ``block`` with autograd on and count the bytes it saves for backward.

    Parameters and the input are excluded (counted elsewhere); a tensor saved twice
    counts once.
    """
    saved: dict[tuple[int, int], int] = {}
    # The input is the previous layer's output, already counted there.
    excluded = {p.data_ptr() for p in block.parameters()} | {x.data_ptr()}

    def pack(tensor: Tensor) -> Tensor:
        ptr = tensor.data_ptr()
        if ptr not in excluded:
            saved[(ptr, tensor.numel())] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = block(x)
    h = out[0] if isinstance(block, Block) else out
    return h, sum(saved.values())


def memory_costs(backbone: Backbone, spec: InputSpec, batch_size: int) -> list[float]:
    """Training memory per block at ``batch_size``, in bytes (stem counted into block 0).

    Activations: the bytes autograd saves for backward in a forward pass on a small batch
    (eval mode, so running statistics are untouched), scaled linearly to ``batch_size``,
    plus the block's output, which the next block or the outbox holds.
    Parameters: ``PARAM_COPIES`` float32 copies of each weight.
    """
    layers: list[nn.Module] = [backbone.stem, *backbone.blocks]
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.eval()
    x = torch.zeros(PROBE_BATCH, spec.channels, spec.size, spec.size, requires_grad=True)
    per_layer: list[float] = []
    with torch.enable_grad():
        for layer in layers:
            x, activation = saved_activation_bytes(layer, x)
            activation += x.numel() * x.element_size()
            params = parameter_count(layer) * FLOAT_BYTES * PARAM_COPIES
            per_layer.append(activation * batch_size / PROBE_BATCH + params)
    for layer, mode in zip(layers, modes):
        layer.train(mode)
    return [per_layer[0] + per_layer[1], *per_layer[2:]]


def block_costs(
    backbone: Backbone, spec: InputSpec, kind: str, batch_size: int = 64
) -> list[float]:
    """One cost per block: ``params`` (parameter count) or ``memory`` (training bytes).

    The stem's cost is added to block 0's, since the stem belongs to module 1.
    """
    if kind == "params":
        costs = [float(parameter_count(block)) for block in backbone.blocks]
        costs[0] += parameter_count(backbone.stem)
        return costs
    if kind == "memory":
        return memory_costs(backbone, spec, batch_size)
    raise ValueError(f"unknown block cost {kind!r}; choose one of {', '.join(COST_KINDS)}")


def check_explicit(explicit: Sequence[int], num_blocks: int, num_modules: int) -> list[int]:
    counts = [int(c) for c in explicit]
    if len(counts) != num_modules:
        raise ValueError(
            f"explicit split {counts} has {len(counts)} entries for {num_modules} modules"
        )
    if any(c < 1 for c in counts):
        raise ValueError(f"explicit split {counts}: every module needs at least one block")
    if sum(counts) != num_blocks:
        raise ValueError(f"explicit split {counts} sums to {sum(counts)}, not {num_blocks} blocks")
    return counts


def split_blocks(
    kind: str,
    backbone: Backbone,
    spec: InputSpec,
    num_modules: int,
    explicit: Sequence[int] = (),
) -> list[int]:
    """Blocks per module for ``num_modules`` modules; ``explicit`` counts win when given."""
    num_blocks = len(backbone.blocks)
    check_feasible(num_blocks, num_modules, backbone.name)
    if explicit:
        return check_explicit(explicit, num_blocks, num_modules)
    if kind == "equal-depth":
        return equal_depth(num_blocks, num_modules)
    if kind == "equal-params":
        return balanced_partition(block_costs(backbone, spec, "params"), num_modules)
    if kind == "equal-memory":
        return balanced_partition(block_costs(backbone, spec, "memory"), num_modules)
    raise ValueError(f"unknown split {kind!r}; choose one of {', '.join(SPLIT_KINDS)}")
