"""The items of a batch schedule: TRAIN and EVAL batches, then END (or ERROR) closes it.

Stage 0 draws them from the data; a downstream stage receives them from the previous one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from torch import Tensor


class Kind(enum.IntEnum):
    """What a batch means to the stage that receives it (the values are on the wire)."""

    TRAIN = 0
    EVAL = 1
    END = 2
    ERROR = 3


@dataclass
class Batch:
    """One activation batch with everything a downstream stage needs for its local loss."""

    kind: Kind
    step: int  # global train step of this batch (stage 0's counter)
    epoch: int
    x: Tensor | None  # activations, float dtype
    y: Tensor | None  # labels, int64 (B,)
    ids: Tensor | None  # sample ids, int64 (B,)
    message: str = ""  # the cause for ERROR, optional for END
    ready: Any = None  # on GPU: the CUDA event after which x is complete (set at handoff)

    def nbytes(self) -> int:
        """Bytes of the tensors and message this batch holds."""
        tensors = (t for t in (self.x, self.y, self.ids) if t is not None)
        return sum(t.numel() * t.element_size() for t in tensors) + len(self.message.encode())
