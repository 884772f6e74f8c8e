"""How a backbone's blocks are divided into K consecutive modules.

``equal-depth`` divides the block count as evenly as possible; ``equal-params``,
``equal-memory`` and ``equal-time`` balance a per-block cost with an exact contiguous
partition. An explicit list of block counts always wins.

Cost model of ``equal-time``: a module's training step costs the forward+backward time
of its blocks (the stem counted into block 0) plus that of ONE auxiliary head with its
loss, placed after the module's last block, so a head is charged once per module, at
the feature shape where it runs. Times are measured at the configured batch size with
one thread: a warm-up run, then the median of a few. The optimizer step is not counted.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trgl_dist.network.heads import build_head
from trgl_dist.network.models import Backbone, Block, InputSpec

SPLIT_KINDS = ("equal-depth", "equal-params", "equal-memory", "equal-time")
COST_KINDS = ("params", "memory", "time")
#: Timed runs per block after one warm-up run; the median is kept.
TIME_REPEATS = 3
GroupCost = Callable[[int, int], float]
#: Bytes per float32 element.
FLOAT_BYTES = 4
#: Copies of each parameter held while training: the weight, its gradient and up to two
#: optimizer buffers (SGD momentum uses one, Adam/AdamW two). An upper bound for SGD.
PARAM_COPIES = 4
#: Batch of the forward pass that measures activations; bytes scale linearly from it.
PROBE_BATCH = 2
#: Relative tolerance under which two partition costs count as equal (float sums).
TIE_TOLERANCE = 1e-9
CPU = torch.device("cpu")


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


def min_max_group_sum(group: GroupCost, n: int, num_modules: int) -> float:
    """The smallest achievable largest group cost (exact DP over contiguous splits)."""
    inf = float("inf")
    # best[k][i]: smallest max group cost splitting the first i blocks into k groups.
    best = [[inf] * (n + 1) for _ in range(num_modules + 1)]
    best[0][0] = 0.0
    for k in range(1, num_modules + 1):
        for i in range(k, n - num_modules + k + 1):
            best[k][i] = min(max(best[k - 1][j], group(j, i)) for j in range(k - 1, i))
    return best[num_modules][n]


def balanced_partition(
    costs: Sequence[float], num_modules: int, tails: Sequence[float] | None = None
) -> list[int]:
    """Contiguous partition of ``costs`` into K non-empty groups; returns block counts.

    A group's cost is the sum of its blocks' costs, plus ``tails[j]`` when its last block
    is j (equal-time: the head that runs after it). First minimizes the largest group
    cost. Among the optimal partitions, it then prefers the most even one (smallest sum of
    squared group costs), then the one whose earlier groups hold more blocks, so equal
    costs give exactly :func:`equal_depth`.
    """
    n = len(costs)
    check_feasible(n, num_modules)
    if tails is not None and len(tails) != n:
        raise ValueError(f"{len(tails)} tail costs for {n} blocks")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + float(cost))
    tail = [0.0] * n if tails is None else [float(t) for t in tails]

    def group(start: int, end: int) -> float:
        return prefix[end] - prefix[start] + tail[end - 1]

    bound = min_max_group_sum(group, n, num_modules)
    # rest[k][i]: smallest sum of squares splitting blocks[i:] into k groups within bound.
    rest = [[float("inf")] * (n + 1) for _ in range(num_modules + 1)]
    rest[0][n] = 0.0
    for k in range(1, num_modules + 1):
        for i in range(n - k, -1, -1):
            rest[k][i] = min_sum_of_squares(group, rest[k - 1], bound, i, n - k + 1)
    return largest_first_counts(group, n, rest, bound, num_modules)


def min_sum_of_squares(
    group: GroupCost, rest_after: list[float], bound: float, start: int, last_end: int
) -> float:
    """Best (group cost squared + rest) over groups blocks[start:end], end <= last_end."""
    candidates = (
        group(start, end) ** 2 + rest_after[end]
        for end in range(start + 1, last_end + 1)
        if is_within(group(start, end), bound)
    )
    return min(candidates, default=float("inf"))


def largest_first_counts(
    group: GroupCost, n: int, rest: list[list[float]], bound: float, num_modules: int
) -> list[int]:
    """Rebuild the optimal partition, giving each group as many blocks as it can take."""
    counts: list[int] = []
    i = 0
    for k in range(num_modules, 0, -1):
        target = rest[k][i]
        for j in range(n - k + 1, i, -1):  # largest group first: deterministic tie-break
            cost = group(i, j)
            if is_within(cost, bound) and is_within(cost**2 + rest[k - 1][j], target):
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


@dataclass(frozen=True)
class TimeProfile:
    """Forward+backward seconds of each block (stem in block 0) and of a head after it: what
    the equal-time split balances. (The planner times whole modules instead:
    planning/profile.py.)"""

    blocks: list[float]
    heads: list[float]  # heads[j]: a head (and its loss) on block j's output


def median_seconds(
    run: Callable[[], object], repeats: int = TIME_REPEATS, device: torch.device = CPU
) -> float:
    """Median wall time of ``run`` after a warm-up; on GPU the device is synchronized around
    each run, so the time is the kernels' and not only their launch."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *args: None)
    run()  # warm-up: allocator and kernel selection
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def block_pass(layer: nn.Module, x: Tensor) -> Callable[[], None]:
    """One forward+backward of a stem or block, with a TRGL-like loss on output and residues."""

    def run() -> None:
        out = layer(x)
        h, residues = out if isinstance(layer, Block) else (out, [])
        loss = h.float().mean() + sum((r.float().pow(2).mean() for r in residues), h.new_zeros(()))
        loss.backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return run


def head_pass(head: nn.Module, h: Tensor, num_classes: int) -> Callable[[], None]:
    """One forward+backward of a head with its cross-entropy, the gradient reaching ``h``."""
    y = torch.arange(len(h), device=h.device) % num_classes

    def run() -> None:
        nn.functional.cross_entropy(head(h), y).backward()
        head.zero_grad(set_to_none=True)
        h.grad = None

    return run


def profile_times(
    backbone: Backbone,
    spec: InputSpec,
    batch_size: int,
    head: str,
    repeats: int = TIME_REPEATS,
    device: torch.device = CPU,
) -> TimeProfile:
    """Time every block and a head after it on ``device``, on copies (the model is
    untouched, its BatchNorm statistics and the global RNG too); blocks of one type, input
    shape and parameter shapes compute the same, so one of them is timed for all. On CPU
    with one thread: a pipeline stage runs with one (torchrun sets OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            return _profile(backbone, spec, batch_size, head, repeats, device)
    finally:
        torch.set_num_threads(threads)


def _profile(
    backbone: Backbone,
    spec: InputSpec,
    batch_size: int,
    head: str,
    repeats: int,
    device: torch.device,
) -> TimeProfile:
    x = torch.rand(batch_size, spec.channels, spec.size, spec.size, device=device)
    layers: list[nn.Module] = [backbone.stem, *backbone.blocks]
    seconds: list[float] = []
    heads: list[float] = []  # forward+backward of the head after block j
    by_shape: dict[tuple[int, ...], float] = {}  # one resolution, one head cost
    alike: dict[tuple[object, ...], float] = {}  # blocks that compute the same
    for index, layer in enumerate(layers):
        probe = copy.deepcopy(layer).to(device).train()
        x = x.detach().requires_grad_(index > 0)  # the data needs no gradient
        kind = (type(layer), tuple(x.shape), *(p.shape for p in layer.parameters()))
        if kind not in alike:
            alike[kind] = median_seconds(block_pass(probe, x), repeats, device)
        seconds.append(alike[kind])
        with torch.no_grad():
            out = probe(x)
        x = out[0] if isinstance(probe, Block) else out
        shape = tuple(x.shape[1:])
        if index > 0 and shape not in by_shape:
            aux = build_head(head, shape, spec.num_classes, backbone.layout).to(device).train()
            h = x.detach().requires_grad_(True)
            by_shape[shape] = median_seconds(head_pass(aux, h, spec.num_classes), repeats, device)
        if index > 0:
            heads.append(by_shape[shape])
    return TimeProfile([seconds[0] + seconds[1], *seconds[2:]], heads)


def block_costs(
    backbone: Backbone, spec: InputSpec, kind: str, batch_size: int = 64, head: str = "1cnn"
) -> list[float]:
    """One cost per block: ``params`` (parameter count), ``memory`` (training bytes) or
    ``time`` (forward+backward seconds at ``batch_size``, heads excluded: see
    :func:`profile_times` for those).

    The stem's cost is added to block 0's, since the stem belongs to module 1.
    """
    if kind == "params":
        costs = [float(parameter_count(block)) for block in backbone.blocks]
        costs[0] += parameter_count(backbone.stem)
        return costs
    if kind == "memory":
        return memory_costs(backbone, spec, batch_size)
    if kind == "time":
        return profile_times(backbone, spec, batch_size, head).blocks
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
    *,
    batch_size: int = 128,
    head: str = "1cnn",
    profiler: Callable[[Backbone, InputSpec, int, str], TimeProfile] = profile_times,
) -> list[int]:
    """Blocks per module for ``num_modules`` modules; ``explicit`` counts win when given.

    ``batch_size`` and ``head`` shape the equal-time profile, taken by ``profiler``.
    """
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
    if kind == "equal-time":
        profile = profiler(backbone, spec, batch_size, head)
        return balanced_partition(profile.blocks, num_modules, tails=profile.heads)
    raise ValueError(f"unknown split {kind!r}; choose one of {', '.join(SPLIT_KINDS)}")
