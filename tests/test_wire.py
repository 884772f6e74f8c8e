"""Wire format: header encode/decode, byte counts, and real send/recv between Gloo ranks."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_workers
from trgl_dist.runtime.planes import LinkEnd
from trgl_dist.runtime.streams import DeviceStreams
from trgl_dist.runtime.topology import Topology
from trgl_dist.runtime.wire import MAGIC, WireError, WireFormat, wire_bytes
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


WIRE = WireFormat(max_labels=6)


def test_control_message_round_trip() -> None:
    batch = Batch(Kind.EVAL, 12, 3, torch.zeros(5, 3, 2, 2, dtype=torch.float16), labels(5), None)
    control = WIRE.new_buffer()
    WIRE.encode(batch, control)
    assert control.dtype == torch.int64 and control.shape == (WIRE.length,)
    assert control[0].item() == MAGIC
    header, y, ids, message = WIRE.decode(control)
    assert (header.kind, header.step, header.epoch) == (Kind.EVAL, 12, 3)
    assert header.dtype == torch.float16 and header.shape == (5, 3, 2, 2)
    assert torch.equal(y, labels(5)) and ids is None and message == ""
    control.zero_()  # the decoded labels are copies: the buffer can be reused at once
    assert torch.equal(y, labels(5))


def test_a_bare_end_carries_its_message() -> None:
    control = WIRE.new_buffer()
    WIRE.encode(Batch(Kind.END, 7, 1, None, None, None, message="é fin"), control)
    header, y, ids, message = WIRE.decode(control)
    assert header.kind == Kind.END and header.dtype is None and header.shape == ()
    assert (y, ids, message) == (None, None, "é fin")


def test_decode_rejects_garbage() -> None:
    with pytest.raises(WireError, match="corrupt"):
        WIRE.decode(WIRE.new_buffer())  # no magic
    control = WIRE.new_buffer()
    WIRE.encode(Batch(Kind.END, 1, 0, None, None, None), control)
    control[1] = 9  # no such kind
    with pytest.raises(WireError, match="corrupt"):
        WIRE.decode(control)


def test_encode_rejects_what_the_wire_cannot_carry() -> None:
    out = WIRE.new_buffer()
    with pytest.raises(WireError, match="dtype"):
        WIRE.encode(Batch(Kind.TRAIN, 0, 0, torch.zeros(2, dtype=torch.int32), None, None), out)
    with pytest.raises(WireError, match="dims"):
        WIRE.encode(Batch(Kind.TRAIN, 0, 0, torch.zeros([1] * 7), None, None), out)
    with pytest.raises(WireError, match="same length"):
        WIRE.encode(Batch(Kind.TRAIN, 0, 0, None, labels(3), labels(2)), out)
    with pytest.raises(WireError, match="at most 6"):
        WIRE.encode(Batch(Kind.TRAIN, 0, 0, None, labels(7), None), out)


def test_wire_bytes_count_the_control_message_and_the_payload() -> None:
    batch = Batch(Kind.ERROR, 0, 0, torch.zeros(2, 3, dtype=torch.float16), labels(2), None, "ab")
    assert wire_bytes(batch, WIRE) == WIRE.length * 8 + 12


def exchange(topology: Topology) -> list[Batch] | int:
    """Rank 0 sends every sample batch to rank 1, which returns what it received."""
    streams = DeviceStreams(topology.device)
    if topology.is_first:
        end = LinkEnd(topology.outbound_link(), WIRE, topology.device, streams)
        return sum(end.send(streams.handoff(b)) for b in sample_batches())
    end = LinkEnd(topology.inbound_link(), WIRE, topology.device, streams)
    return [end.recv() for _ in sample_batches()]


def test_send_recv_round_trip_between_ranks() -> None:
    sent, received = run_workers(exchange, 2, deadline_s=60)
    assert not sent.error and not received.error, sent.error + received.error
    assert (sent.exitcode, received.exitcode) == (0, 0)
    want = sample_batches()
    assert sent.value == sum(wire_bytes(b, WIRE) for b in want)
    assert len(received.value) == len(want)
    for got, expected in zip(received.value, want):
        assert_same_batch(got, expected)
