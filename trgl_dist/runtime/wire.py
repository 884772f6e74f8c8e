"""The wire format of one batch between two stages: a fixed-size control message, then one payload.

The control message is a single int64 CPU tensor of a size both ends know in advance: the
header (kind, step, epoch, the activations' dtype and shape), the labels and sample ids,
and the text of an END or ERROR message. It travels on the link's control plane (Gloo).
The activations, if any, follow as one contiguous tensor on the payload plane; the
receiver posts that recv only after the control message said what to expect, so no
payload operation ever waits for a peer that may be gone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trgl_dist.training.items import Batch, Kind

MAX_NDIM = 6
MAX_MESSAGE_BYTES = 1024
# Guards against a desynchronized stream: a header that does not start with it is garbage.
MAGIC = 0x7467_6C64  # "tgld"

# Header slots (int64 each).
_MAGIC, _KIND, _STEP, _EPOCH, _DTYPE, _NDIM = range(6)
_SHAPE = 6  # _SHAPE .. _SHAPE + MAX_NDIM - 1
_NUM_LABELS = _SHAPE + MAX_NDIM  # B of y/ids, -1 when both are absent
_LABEL_MASK = _NUM_LABELS + 1  # bit 0: y present, bit 1: ids present
_MESSAGE_LEN = _LABEL_MASK + 1
HEADER_LEN = _MESSAGE_LEN + 1
_MESSAGE_SLOTS = MAX_MESSAGE_BYTES // 8

_NO_TENSOR = -1
# Codes are part of the wire format: append only, never renumber.
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}
_DTYPES_BY_CODE = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_Y_PRESENT, _IDS_PRESENT = 1, 2
_KINDS = frozenset(int(kind) for kind in Kind)


class WireError(ValueError):
    """A batch that does not fit the wire format, or a control message that is not one."""


@dataclass(frozen=True)
class Header:
    """The decoded header: enough to allocate the payload that follows."""

    kind: Kind
    step: int
    epoch: int
    dtype: torch.dtype | None  # None: no payload
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WireFormat:
    """The control message of a link that carries batches of at most ``max_labels`` samples."""

    max_labels: int

    @property
    def length(self) -> int:
        """int64 values in one control message."""
        return HEADER_LEN + 2 * self.max_labels + _MESSAGE_SLOTS

    def new_buffer(self) -> Tensor:
        return torch.zeros(self.length, dtype=torch.int64)

    def encode(self, batch: Batch, out: Tensor) -> None:
        """Write ``batch``'s control message into ``out`` (a CPU int64 tensor of ``length``)."""
        out.zero_()
        header = [0] * HEADER_LEN
        header[_MAGIC], header[_KIND] = MAGIC, int(batch.kind)
        header[_STEP], header[_EPOCH] = batch.step, batch.epoch
        header[_DTYPE], header[_NDIM] = _NO_TENSOR, 0
        if batch.x is not None:
            if batch.x.dtype not in _DTYPE_CODES:
                raise WireError(f"unsupported activation dtype {batch.x.dtype}")
            if batch.x.ndim > MAX_NDIM:
                raise WireError(f"activations have {batch.x.ndim} dims, at most {MAX_NDIM}")
            header[_DTYPE], header[_NDIM] = _DTYPE_CODES[batch.x.dtype], batch.x.ndim
            header[_SHAPE : _SHAPE + batch.x.ndim] = batch.x.shape
        header[_NUM_LABELS] = _NO_TENSOR
        message = batch.message.encode("utf-8")[:MAX_MESSAGE_BYTES]
        header[_MESSAGE_LEN] = len(message)
        if batch.y is not None or batch.ids is not None:
            header[_NUM_LABELS] = self._write_labels(batch, out)
            header[_LABEL_MASK] = (_Y_PRESENT if batch.y is not None else 0) | (
                _IDS_PRESENT if batch.ids is not None else 0
            )
        out[:HEADER_LEN] = torch.tensor(header, dtype=torch.int64)
        if message:
            text = out[self.length - _MESSAGE_SLOTS :].view(torch.uint8)
            text[: len(message)] = torch.frombuffer(bytearray(message), dtype=torch.uint8)

    def _write_labels(self, batch: Batch, out: Tensor) -> int:
        sizes = {t.shape[0] for t in (batch.y, batch.ids) if t is not None}
        if len(sizes) != 1:
            raise WireError(f"y and ids must have the same length, got sizes {sorted(sizes)}")
        n = sizes.pop()
        if n > self.max_labels:
            raise WireError(f"a batch of {n} samples; this link carries at most {self.max_labels}")
        for row, t in enumerate((batch.y, batch.ids)):
            if t is not None:
                start = HEADER_LEN + row * self.max_labels
                out[start : start + n] = t.to(device="cpu", dtype=torch.int64)
        return n

    def decode(self, control: Tensor) -> tuple[Header, Tensor | None, Tensor | None, str]:
        """(header, labels, sample ids, message) of a control message; the labels and ids are
        copies, so ``control`` may be reused at once."""
        values = control[:HEADER_LEN].tolist()
        ndim, code, n = values[_NDIM], values[_DTYPE], values[_NUM_LABELS]
        if (
            values[_MAGIC] != MAGIC
            or not 0 <= ndim <= MAX_NDIM
            or (code != _NO_TENSOR and code not in _DTYPES_BY_CODE)
            or values[_KIND] not in _KINDS
            or not -1 <= n <= self.max_labels
            or not 0 <= values[_MESSAGE_LEN] <= MAX_MESSAGE_BYTES
        ):
            raise WireError(f"corrupt control message (stream out of sync?): {values}")
        header = Header(
            kind=Kind(values[_KIND]),
            step=values[_STEP],
            epoch=values[_EPOCH],
            dtype=None if code == _NO_TENSOR else _DTYPES_BY_CODE[code],
            shape=tuple(values[_SHAPE : _SHAPE + ndim]),
        )
        mask = values[_LABEL_MASK] if n >= 0 else 0
        y = self._labels(control, 0, n) if mask & _Y_PRESENT else None
        ids = self._labels(control, 1, n) if mask & _IDS_PRESENT else None
        text = control[self.length - _MESSAGE_SLOTS :].view(torch.uint8)
        message = bytes(text[: values[_MESSAGE_LEN]].tolist()).decode("utf-8", errors="replace")
        return header, y, ids, message

    def _labels(self, control: Tensor, row: int, n: int) -> Tensor:
        start = HEADER_LEN + row * self.max_labels
        return control[start : start + n].clone()


def wire_bytes(batch: Batch, wire: WireFormat) -> int:
    """Bytes ``batch`` occupies on the wire: its control message and its payload."""
    payload = batch.x.numel() * batch.x.element_size() if batch.x is not None else 0
    return wire.length * 8 + payload
