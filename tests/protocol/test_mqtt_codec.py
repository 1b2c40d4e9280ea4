"""The sans-IO MQTT client connection (protocol/mqtt): encodings, events, limits, refusals."""

from __future__ import annotations

import pytest

from protocol.errors import LocalProtocolError
from protocol.mqtt import (
    V5,
    ConnAck,
    Connection,
    Disconnect,
    Dropped,
    PubAck,
    Publish,
    State,
    SubAck,
    UnsubAck,
    Violation,
)
from protocol.mqtt.packets import encode_properties, varint
from tests.fuzz.test_fuzz_broker_stream import publish


def events(conn: Connection) -> list[object]:
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def connected(version: int = 4, *, connack_props: bytes = b"", **kw: int) -> Connection:
    conn = Connection(version=version, **kw)
    conn.connect(client_id="c", keepalive=30)
    conn.data_to_send()
    body = b"\x00\x00" + (connack_props or (b"\x00" if version == V5 else b""))
    conn.receive_data(b"\x20" + varint(len(body)) + body)
    (ack,) = events(conn)
    assert isinstance(ack, ConnAck)
    assert ack.accepted
    return conn


def test_connect_packets_of_both_versions() -> None:
    c4 = Connection()
    c4.connect(client_id="abc", keepalive=30, username="u", password="p")
    assert b"".join(c4.data_to_send()) == (
        b"\x10\x15\x00\x04MQTT\x04\xc2\x00\x1e\x00\x03abc\x00\x01u\x00\x01p"
    )
    c5 = Connection(version=V5, max_packet_size=131072)
    c5.connect(client_id="abc", keepalive=30, session_expiry=60, announce_limit=True)
    packet = b"".join(c5.data_to_send())
    # level 5, clean start, properties: session expiry 60, maximum packet size 131072
    assert packet[2:10] == b"\x00\x04MQTT\x05\x02"
    assert packet[12:] == b"\x0a\x11\x00\x00\x00\x3c\x27\x00\x02\x00\x00\x00\x03abc"


def test_messages_split_at_every_byte_give_the_same_events() -> None:
    stream = (
        b"\x20\x02\x00\x00"
        + publish("a/b", b"x" * 40000, qos=1, mid=9)
        + publish("a/c", b"small")
        + b"\x40\x02\x00\x05"
        + b"\x90\x03\x00\x06\x01"
        + b"\xb0\x02\x00\x07"
    )
    whole = Connection(max_packet_size=1 << 20)
    whole.connect(client_id="c", keepalive=30)
    whole.receive_data(stream)
    expected = events(whole)
    assert [type(e) for e in expected] == [ConnAck, Publish, Publish, PubAck, SubAck, UnsubAck]
    assert expected[1] == Publish("a/b", b"x" * 40000, 1, False, False)
    for cut in (1, 2, 5, 7, 4000, 40007, len(stream) - 1):
        conn = Connection(max_packet_size=1 << 20)
        conn.connect(client_id="c", keepalive=30)
        conn.receive_data(stream[:cut])
        conn.receive_data(stream[cut:])
        assert events(conn) == expected
        assert b"\x40\x02\x00\x09" in b"".join(bytes(b) for b in conn.data_to_send())


def test_an_oversize_publish_is_skipped_and_acknowledged_not_buffered() -> None:
    conn = connected(max_packet_size=1024)
    conn.receive_data(publish("a/b", bytes(5000), qos=1, mid=3) + publish("a/b", b"ok"))
    assert events(conn) == [
        Dropped("oversize", 3 + 2 + 3 + 2 + 5000),
        Publish("a/b", b"ok", 0, False, False),
    ]
    assert conn.data_to_send() == [b"\x40\x02\x00\x03"]


def test_a_violation_is_the_last_event_and_closes() -> None:
    conn = connected()
    conn.receive_data(publish("a/b", b"1") + b"\x62\x02\x00\x01" + publish("a/b", b"2"))
    evs = events(conn)
    assert evs[0] == Publish("a/b", b"1", 0, False, False)
    assert isinstance(evs[1], Violation)
    assert len(evs) == 2
    assert conn.state is State.CLOSED
    conn.receive_data(publish("a/b", b"3"))
    assert events(conn) == []


def test_packets_before_connack_and_a_second_connack_are_violations() -> None:
    conn = Connection()
    conn.connect(client_id="c", keepalive=30)
    conn.receive_data(publish("a/b", b"early"))
    assert isinstance(events(conn)[0], Violation)
    conn = connected()
    conn.receive_data(b"\x20\x02\x00\x00")
    assert isinstance(events(conn)[0], Violation)


def test_mqtt5_connack_limits_bind_what_we_send() -> None:
    props = encode_properties({0x27: 2048, 0x21: 10, 0x24: 1, 0x25: 0})
    conn = connected(V5, connack_props=props)
    assert conn.limits is not None
    assert conn.limits.max_packet_size == 2048
    assert conn.limits.receive_maximum == 10
    assert conn.limits.maximum_qos == 1
    assert not conn.limits.retain_available
    overhead = conn.publish_overhead(b"t/x", 1)
    conn.publish(b"t/x", bytes(2048 - overhead), 1, False, False, 1)
    with pytest.raises(LocalProtocolError, match="packet limit of 2048"):
        conn.publish(b"t/x", bytes(2048), 1, False, False, 2)


def test_mqtt5_publish_properties_puback_reasons_and_disconnect() -> None:
    conn = connected(V5)
    props = encode_properties({0x02: 60})  # message expiry: skipped, not delivered
    conn.receive_data(publish("a/b", props + b"hi", qos=1, mid=4))
    conn.receive_data(b"\x40\x03\x00\x08\x97")  # PUBACK 8: quota exceeded
    conn.receive_data(b"\x90\x04\x00\x02\x00\x87")  # SUBACK: not authorised
    conn.receive_data(b"\xe0\x02\x95\x00")  # DISCONNECT: packet too large
    assert events(conn) == [
        Publish("a/b", b"hi", 1, False, False),
        PubAck(8, 0x97),
        SubAck(2, b"\x87"),
        Disconnect(0x95, None),
    ]
    assert conn.state is State.CLOSED


def test_a_311_connack_to_a_v5_connect_reads_as_a_version_refusal() -> None:
    conn = Connection(version=V5)
    conn.connect(client_id="c", keepalive=30)
    conn.receive_data(b"\x20\x02\x00\x01")
    (ack,) = events(conn)
    assert isinstance(ack, ConnAck)
    assert ack.version_refused
    assert ack.version == 4
    assert conn.state is State.CLOSED


def test_misuse_raises_local_errors() -> None:
    conn = Connection()
    with pytest.raises(LocalProtocolError):
        conn.publish(b"t", b"x", 0, False, False, 0)
    conn.connect(client_id="c", keepalive=30)
    with pytest.raises(LocalProtocolError):
        conn.connect(client_id="c", keepalive=30)
    with pytest.raises(LocalProtocolError):
        Connection(version=3)
