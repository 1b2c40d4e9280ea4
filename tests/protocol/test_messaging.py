"""Channel messages: codec strictness, exactly-once in-order delivery, retransmission."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.messaging import (
    MAX_INDEX_SIZE,
    MAX_INDEX_STATEMENTS,
    MAX_MESSAGE,
    ChannelAck,
    ChannelMessage,
    InboundChannel,
    OutboundChannel,
    RevocationPush,
    TransferPayload,
    check_channel,
    decode_app,
    decode_revocation_index,
    encode_revocation_index,
)


@pytest.mark.parametrize(
    "obj",
    [
        ChannelMessage("fl/round-1", 1, b"weights"),
        ChannelMessage("a", 2**63 - 1, b""),
        ChannelAck("x.y_z", 7),
        RevocationPush(b"s" * 100),
    ],
)
def test_roundtrip(obj: ChannelMessage | ChannelAck | RevocationPush) -> None:
    assert decode_app(obj.encode()) == obj


def test_transfer_tags_pass_through_undecoded() -> None:
    raw = msgpack.packb([40, "anything", b"x"])
    assert decode_app(raw) == TransferPayload(40, raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        msgpack.packb({"a": 1}),
        msgpack.packb([]),
        msgpack.packb(["1", "c", 1, b""]),
        msgpack.packb([1, "c", 1]),
        msgpack.packb([1, "bad channel!", 1, b""]),
        msgpack.packb([1, "c\n", 1, b""]),  # a trailing newline is not a channel name
        msgpack.packb([2, "c\n", 1]),
        msgpack.packb([1, "c", -1, b""]),
        msgpack.packb([1, "c", True, b""]),
        msgpack.packb([1, "c", 1, "text not bytes"]),
        msgpack.packb([1, "c", 1, b"x" * (MAX_MESSAGE + 1)]),
        msgpack.packb([2, "c"]),
        msgpack.packb([3, "not bytes"]),
        msgpack.packb([9, 1]),
        msgpack.packb([1, "c", 1, b""]) + b"trailing",
    ],
)
def test_malformed_is_a_remote_error(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_app(raw)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_fuzz_only_documented_errors(raw: bytes) -> None:
    try:
        decode_app(raw)
    except RemoteProtocolError:
        pass


@pytest.mark.parametrize("name", ["", "-x", "a b", "a" * 65, "é", "abc\n"])
def test_bad_channel_names(name: str) -> None:
    with pytest.raises(LocalProtocolError):
        check_channel(name)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60), st.randoms(use_true_random=False))
def test_any_arrival_order_with_duplicates_delivers_each_once_in_order(
    n: int, rng: random.Random
) -> None:
    arrivals = [ChannelMessage("c", s, b"%d" % s) for s in range(1, n + 1)]
    arrivals += rng.choices(arrivals, k=n // 2)  # duplicates
    rng.shuffle(arrivals)
    inbound = InboundChannel(max_ahead=1000)
    delivered = []
    for msg in arrivals:
        result = inbound.receive(msg)
        delivered.extend(m.seq for m in result.deliver)
        assert result.ack == inbound.last
    assert delivered == list(range(1, n + 1))
    assert inbound.buffered == 0


def test_reorder_buffer_is_bounded() -> None:
    inbound = InboundChannel(max_ahead=4)
    for seq in range(2, 20):
        inbound.receive(ChannelMessage("c", seq, b""))
    assert inbound.buffered == 3  # 2, 3, 4; 5 and beyond are beyond the bound
    result = inbound.receive(ChannelMessage("c", 1, b""))
    assert [m.seq for m in result.deliver] == [1, 2, 3, 4]


def test_resume_from_persisted_counter_drops_old_duplicates() -> None:
    inbound = InboundChannel(last=10)
    assert inbound.receive(ChannelMessage("c", 10, b"")).duplicate
    assert [m.seq for m in inbound.receive(ChannelMessage("c", 11, b"")).deliver] == [11]


def test_outbound_window_retransmission_and_acks() -> None:
    out = OutboundChannel(window=3, rto=2.0)
    pending = [1, 2, 3, 4, 5]
    assert out.due(pending, 0.0) == [1, 2, 3]
    assert out.due(pending, 1.0) == []
    assert out.due(pending, 2.0) == [1, 2, 3]  # retransmitted after the RTO
    assert not out.ack(9)  # never sent: a peer cannot make us skip messages
    assert out.ack(2)
    assert not out.ack(2)
    assert out.due([3, 4, 5], 2.5) == [4, 5]
    out.reset()
    assert out.due([3, 4, 5], 2.6) == [3, 4, 5]
    assert out.next_deadline() == pytest.approx(4.6)


# -- the revocation index ----------------------------------------------------------------------


def test_revocation_index_round_trips_newest_first_and_bounded() -> None:
    statements = [bytes([i]) * 300 for i in range(1, 80)]
    encoded = encode_revocation_index(statements)
    decoded = decode_revocation_index(encoded)
    assert decoded == statements[: len(decoded)]  # the issuer's order, a prefix
    assert len(encoded) <= MAX_INDEX_SIZE
    assert 0 < len(decoded) <= MAX_INDEX_STATEMENTS
    small = [bytes([i]) * 10 for i in range(1, 80)]
    assert len(decode_revocation_index(encode_revocation_index(small))) == MAX_INDEX_STATEMENTS
    assert decode_revocation_index(encode_revocation_index([b"a", b"a", b"b"])) == [b"a", b"b"]
    assert decode_revocation_index(encode_revocation_index([])) == []
    with pytest.raises(LocalProtocolError):
        encode_revocation_index([b""])


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        msgpack.packb([2, [b"x"]]),
        msgpack.packb([1, [b"x", b"x"]]),
        msgpack.packb([1, ["text"]]),
        msgpack.packb([1, [b""]]),
        msgpack.packb([1, [b"x"] * 33]),
        msgpack.packb([1, [b"x"]]) + b"\x00",
        msgpack.packb([1, [b"x" * 4097]]),
        msgpack.packb([1, [b"x"], 3]),
    ],
)
def test_a_malformed_revocation_index_is_a_remote_error(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="malformed revocation index"):
        decode_revocation_index(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_revocation_index_only_documented_errors(raw: bytes) -> None:
    try:
        decode_revocation_index(raw)
    except RemoteProtocolError:
        pass
