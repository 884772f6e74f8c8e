"""Wire format: header encode/decode, byte counts, and real send/recv between Gloo ranks."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_workers
from trgl_dist.runtime.topology import Topology
from trgl_dist.runtime.wire import (
    HEADER_LEN,
    MAGIC,
    decode_header,
    encode_header,
    recv_batch,
    send_batch,
    wire_bytes,
)
from trgl_dist.training.items import Batch, Kind


def labels(batch_size: int, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset, offset + batch_size, dtype=torch.int64)


def sample_batches() -> list[Batch]:
    """Every kind, dtype and shape the pipeline sends, built deterministically."""
    gen = torch.Generator().manual_seed(0)
    image_BCHW = torch.randn(4, 3, 5, 5, generator=gen)
    return [
        Batch(Kind.TRAIN, 0, 0, image_BCHW, labels(4), labels(4, 100)),
        Batch(Kind.TRAIN, 1, 0, torch.randn(4, 10, generator=gen).half(), labels(4), labels(4)),
        # the last batch of an epoch is smaller
        Batch(
            Kind.TRAIN,
            2,
            0,
            torch.randn(2, 3, 5, 5, generator=gen).bfloat16(),
            labels(2),
            labels(2, 7),
        ),
        Batch(Kind.TRAIN, 3, 1, torch.randn(5, 4, generator=gen).t(), labels(4), labels(4)),
        Batch(
            Kind.EVAL, 3, 1, torch.randn(3, 1, 1, 2, 2, 2, generator=gen).double(), labels(3), None
        ),
        Batch(Kind.EVAL, 3, 1, torch.randn(1, 8, generator=gen), None, labels(1, 9)),
        Batch(Kind.END, 4, 2, None, None, None),
        Batch(Kind.END, 4, 2, None, None, None, message="done after 4 steps"),
        Batch(Kind.ERROR, 4, 2, None, None, None, message="stage 0 failed: ValueError ✗ boom"),
    ]


def assert_same_batch(got: Batch, want: Batch) -> None:
    assert (got.kind, got.step, got.epoch, got.message) == (
        want.kind,
        want.step,
        want.epoch,
        want.message,
    )
    for name in ("x", "y", "ids"):
        got_t, want_t = getattr(got, name), getattr(want, name)
        assert (got_t is None) == (want_t is None), name
        if want_t is not None:
            assert got_t.dtype == want_t.dtype and got_t.shape == want_t.shape, name
            assert torch.equal(got_t, want_t), name


def test_header_round_trip() -> None:
    batch = Batch(Kind.EVAL, 12, 3, torch.zeros(5, 3, 2, 2, dtype=torch.float16), labels(5), None)
    header = encode_header(batch)
    assert header.dtype == torch.int64 and header.shape == (HEADER_LEN,)
    assert header[0].item() == MAGIC
    decoded = decode_header(header)
    assert (decoded.kind, decoded.step, decoded.epoch) == (Kind.EVAL, 12, 3)
    assert decoded.dtype == torch.float16 and decoded.shape == (5, 3, 2, 2)
    assert (decoded.num_labels, decoded.label_mask, decoded.message_len) == (5, 1, 0)


def test_header_of_a_bare_end_with_message() -> None:
    decoded = decode_header(encode_header(Batch(Kind.END, 7, 1, None, None, None, message="é")))
    assert decoded.kind == Kind.END and decoded.dtype is None and decoded.shape == ()
    assert decoded.num_labels == -1 and decoded.message_len == 2  # utf-8 bytes, not chars


def test_header_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="corrupt"):
        decode_header(torch.zeros(HEADER_LEN, dtype=torch.int64))
    with pytest.raises(ValueError, match="corrupt"):
        decode_header(torch.zeros(HEADER_LEN - 1, dtype=torch.int64))


def test_encode_rejects_what_the_wire_cannot_carry() -> None:
    with pytest.raises(ValueError, match="dtype"):
        encode_header(Batch(Kind.TRAIN, 0, 0, torch.zeros(2, dtype=torch.int32), None, None))
    with pytest.raises(ValueError, match="dims"):
        encode_header(Batch(Kind.TRAIN, 0, 0, torch.zeros([1] * 7), None, None))
    with pytest.raises(ValueError, match="same length"):
        encode_header(Batch(Kind.TRAIN, 0, 0, None, labels(3), labels(2)))


def test_nbytes_counts_header_payloads_and_message() -> None:
    batch = Batch(Kind.ERROR, 0, 0, torch.zeros(2, 3, dtype=torch.float16), labels(2), None, "ab")
    # header + 6 halfs + (2, 2) int64 labels + 2 message bytes
    assert wire_bytes(batch) == HEADER_LEN * 8 + 12 + 32 + 2


def exchange(topology: Topology) -> list[Batch] | int:
    """Rank 0 sends every sample batch to rank 1, which returns what it received."""
    if topology.is_first:
        group = topology.outbound_group()
        return sum(send_batch(b, 1, group, topology.device) for b in sample_batches())
    group = topology.inbound_group()
    return [recv_batch(0, group, topology.device) for _ in sample_batches()]


def test_send_recv_round_trip_between_ranks() -> None:
    sent, received = run_workers(exchange, 2, deadline_s=60)
    assert not sent.error and not received.error, sent.error + received.error
    assert (sent.exitcode, received.exitcode) == (0, 0)
    want = sample_batches()
    assert sent.value == sum(wire_bytes(b) for b in want)
    assert len(received.value) == len(want)
    for got, expected in zip(received.value, want):
        assert_same_batch(got, expected)
