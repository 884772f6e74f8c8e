"""The wire format of one batch between two pipeline stages: a fixed header, then payloads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from trgl_dist.training.items import Batch, Kind

MAX_NDIM = 6
# Guards against a desynchronized stream: a header that does not start with it is garbage.
MAGIC = 0x7467_6C64  # "tgld"

# Header slots (int64 each). Fixed size, so the receiver always knows what to post first.
_MAGIC, _KIND, _STEP, _EPOCH, _DTYPE, _NDIM = range(6)
_SHAPE = 6  # _SHAPE .. _SHAPE + MAX_NDIM - 1
_NUM_LABELS = _SHAPE + MAX_NDIM  # B of y/ids, -1 when both are absent
_LABEL_MASK = _NUM_LABELS + 1  # bit 0: y present, bit 1: ids present
_MESSAGE_LEN = _LABEL_MASK + 1
HEADER_LEN = _MESSAGE_LEN + 1

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


@dataclass(frozen=True)
class Header:
    """The decoded fixed-size header: enough to allocate every payload that follows."""

    kind: Kind
    step: int
    epoch: int
    dtype: torch.dtype | None  # None: no x payload
    shape: tuple[int, ...]
    num_labels: int  # -1: no label payload
    label_mask: int
    message_len: int


def wire_bytes(batch: Batch) -> int:
    """Bytes ``batch`` occupies on the wire (header included)."""
    total = HEADER_LEN * 8
    if batch.x is not None:
        total += batch.x.numel() * batch.x.element_size()
    if batch.y is not None or batch.ids is not None:
        total += 2 * _num_labels(batch) * 8
    return total + len(batch.message.encode("utf-8"))


def _num_labels(batch: Batch) -> int:
    sizes = {t.shape[0] for t in (batch.y, batch.ids) if t is not None}
    if len(sizes) != 1:
        raise ValueError(f"y and ids must have the same length, got sizes {sorted(sizes)}")
    return sizes.pop()


def encode_header(batch: Batch) -> Tensor:
    """Header of ``batch`` as an int64 tensor of HEADER_LEN values (on CPU)."""
    values = [0] * HEADER_LEN
    values[_MAGIC], values[_KIND] = MAGIC, int(batch.kind)
    values[_STEP], values[_EPOCH] = batch.step, batch.epoch
    values[_DTYPE], values[_NDIM] = _NO_TENSOR, 0
    if batch.x is not None:
        if batch.x.dtype not in _DTYPE_CODES:
            raise ValueError(f"unsupported activation dtype {batch.x.dtype}")
        if batch.x.ndim > MAX_NDIM:
            raise ValueError(f"activations have {batch.x.ndim} dims, at most {MAX_NDIM}")
        values[_DTYPE], values[_NDIM] = _DTYPE_CODES[batch.x.dtype], batch.x.ndim
        values[_SHAPE : _SHAPE + batch.x.ndim] = batch.x.shape
    values[_NUM_LABELS], values[_LABEL_MASK] = _NO_TENSOR, 0
    if batch.y is not None or batch.ids is not None:
        values[_NUM_LABELS] = _num_labels(batch)
        values[_LABEL_MASK] = (_Y_PRESENT if batch.y is not None else 0) | (
            _IDS_PRESENT if batch.ids is not None else 0
        )
    values[_MESSAGE_LEN] = len(batch.message.encode("utf-8"))
    return torch.tensor(values, dtype=torch.int64)


def decode_header(header: Tensor) -> Header:
    """Inverse of :func:`encode_header`; rejects anything that is not a header."""
    values = [int(v) for v in header.tolist()]  # one host sync on NCCL, unavoidable
    if len(values) != HEADER_LEN or values[_MAGIC] != MAGIC or values[_NDIM] > MAX_NDIM:
        raise ValueError(f"corrupt batch header (stream out of sync?): {values}")
    ndim = values[_NDIM]
    dtype_code = values[_DTYPE]
    return Header(
        kind=Kind(values[_KIND]),
        step=values[_STEP],
        epoch=values[_EPOCH],
        dtype=None if dtype_code == _NO_TENSOR else _DTYPES_BY_CODE[dtype_code],
        shape=tuple(values[_SHAPE : _SHAPE + ndim]),
        num_labels=values[_NUM_LABELS],
        label_mask=values[_LABEL_MASK],
        message_len=values[_MESSAGE_LEN],
    )


def _label_payload(batch: Batch, device: torch.device) -> Tensor:
    """(2, B) int64: row 0 the labels, row 1 the sample ids (zeros for an absent row)."""
    num_labels = _num_labels(batch)
    rows = [
        t if t is not None else torch.zeros(num_labels, dtype=torch.int64)
        for t in (batch.y, batch.ids)
    ]
    return torch.stack([r.to(device=device, dtype=torch.int64) for r in rows])


def send_batch(batch: Batch, peer: int, group: ProcessGroup, device: torch.device) -> int:
    """Send ``batch`` to global rank ``peer`` over ``group``; returns the bytes sent.

    Blocking: on Gloo ``send`` returns only once the peer has posted the matching recv,
    which is what gives the pipeline its backpressure. On NCCL every tensor is moved to
    ``device`` (a no-op for activations already there: no host copies). The NCCL path is
    written for GPUs but untested here (no GPU on the development machine): the send is
    ordered after the work already queued on the calling thread's current stream, which
    is the default stream shared with the stage's compute unless the stage sets its own.
    """
    # torch 2.14: ``dst`` is the GLOBAL rank (``group_dst`` would be the in-group rank).
    dist.send(encode_header(batch).to(device), dst=peer, group=group)
    if batch.x is not None:
        dist.send(batch.x.detach().to(device).contiguous(), dst=peer, group=group)
    if batch.y is not None or batch.ids is not None:
        dist.send(_label_payload(batch, device), dst=peer, group=group)
    message = batch.message.encode("utf-8")
    if message:
        payload = torch.frombuffer(bytearray(message), dtype=torch.uint8)
        dist.send(payload.to(device), dst=peer, group=group)
    return wire_bytes(batch)


def _recv(
    shape: tuple[int, ...], dtype: torch.dtype, peer: int, group: ProcessGroup, device: torch.device
) -> Tensor:
    tensor = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(tensor, src=peer, group=group)  # ``src`` is the GLOBAL rank, as for send
    return tensor


def recv_batch(peer: int, group: ProcessGroup, device: torch.device) -> Batch:
    """Receive the next batch sent by global rank ``peer`` over ``group`` (blocking).

    On NCCL the tensors arrive on ``device``; reading the header costs one small host
    sync, everything else stays on the GPU (untested here: no GPU on this machine).
    """
    header = decode_header(_recv((HEADER_LEN,), torch.int64, peer, group, device))
    x = None
    if header.dtype is not None:
        x = _recv(header.shape, header.dtype, peer, group, device)
    y = ids = None
    if header.num_labels >= 0:
        labels_2B = _recv((2, header.num_labels), torch.int64, peer, group, device)
        y = labels_2B[0] if header.label_mask & _Y_PRESENT else None
        ids = labels_2B[1] if header.label_mask & _IDS_PRESENT else None
    message = ""
    if header.message_len > 0:
        payload = _recv((header.message_len,), torch.uint8, peer, group, device)
        message = bytes(payload.cpu().tolist()).decode("utf-8", errors="replace")
    return Batch(header.kind, header.step, header.epoch, x, y, ids, message)
