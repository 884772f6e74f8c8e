"""NCCL's device rules, enforced on CPU so the test suite catches what only a GPU would refuse.

On a GPU machine NCCL takes only CUDA tensors, and a CPU tensor on a group without a CPU
backend fails at run time ("No backend type associated with device type cpu"). On CPU
every group is Gloo and would accept anything, so such a bug would pass every CPU test.
With TRGL_STRICT_DEVICE_RULES=1 (the test suite sets it) every collective and
point-to-point call is checked against the group it uses:
- a "device" group (a payload plane, NCCL on GPU) takes device tensors only;
- a "host" group (a control plane, always Gloo) takes host tensors only;
- the default group takes nothing: it is NCCL-only on GPU, and ranks sharing a GPU could
  not even form it.
On CPU a "device tensor" is one the runtime placed on the stage's device through
:func:`device_tensor` (a payload buffer, a handed-off activation); any other CPU tensor is
host data, as a pinned or pageable CPU tensor would be on a GPU machine.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ENV = "TRGL_STRICT_DEVICE_RULES"
_MARK = "_trgl_device_resident"
#: The torch.distributed calls that move tensors, checked in strict mode.
CHECKED = (
    "send",
    "recv",
    "isend",
    "irecv",
    "broadcast",
    "all_reduce",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "gather",
    "scatter",
    "reduce_scatter",
    "all_to_all",
    "barrier",
    "broadcast_object_list",
    "all_gather_object",
)
_groups: dict[int, tuple[str, str]] = {}  # id(group) -> (kind, name)
_installed = False


class DeviceRuleError(RuntimeError):
    """A tensor on a group that NCCL (or the control plane's Gloo) would refuse."""


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def register(group: Any, kind: str, name: str) -> None:
    """Declare what ``group`` carries: "device" (NCCL on GPU) or "host" (Gloo, CPU)."""
    _groups[id(group)] = (kind, name)


def device_tensor(t: Tensor) -> Tensor:
    """Mark a CPU tensor as resident on the stage's device (strict mode only; a CUDA
    tensor is device data anyway). Returns ``t``."""
    if enabled() and t.device.type == "cpu":
        setattr(t, _MARK, True)
    return t


def is_device_tensor(t: Tensor) -> bool:
    return t.device.type == "cuda" or bool(getattr(t, _MARK, False))


def install_if_enabled(device: torch.device) -> None:
    """Wrap torch.distributed's data calls with the checks (once per process)."""
    global _installed
    if not enabled() or _installed:
        return
    for name in CHECKED:
        original = getattr(dist, name)
        setattr(dist, name, _checked(name, original))
    _installed = True


def _checked(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        check(name, bound.arguments.get("group"), list(_tensors(bound.arguments)))
        return original(*args, **kwargs)

    return call


def check(call: str, group: Any, tensors: list[Tensor]) -> None:
    """Raise DeviceRuleError if ``tensors`` may not travel on ``group`` (None: default)."""
    if group is None or group is dist.GroupMember.WORLD:
        raise DeviceRuleError(
            f"dist.{call} on the default process group: on GPU it is NCCL-only (CPU tensors "
            "are refused) and ranks sharing a GPU cannot form it; use a plane of the topology"
        )
    kind, name = _groups.get(id(group), ("host", "an unregistered group"))
    for t in tensors:
        if kind == "device" and not is_device_tensor(t):
            raise DeviceRuleError(
                f"dist.{call} of a host tensor {tuple(t.shape)} {t.dtype} on {name}: NCCL "
                "takes only tensors on the stage's GPU"
            )
        if kind == "host" and is_device_tensor(t):
            raise DeviceRuleError(
                f"dist.{call} of a device tensor {tuple(t.shape)} on {name}: the control "
                "plane is Gloo and carries CPU tensors only"
            )


def _tensors(arguments: dict[str, Any]) -> Iterator[Tensor]:
    for value in arguments.values():
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, list | tuple):
            yield from (v for v in value if isinstance(v, Tensor))
