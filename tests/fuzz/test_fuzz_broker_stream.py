"""Fuzzing the MQTT client with what a hostile broker may send: after a genuine CONNACK and SUBACK,
a byte stream made of valid packets (PUBLISH at QoS 0 and 1 on subscribed and foreign topics,
PUBACK, SUBACK, UNSUBACK, PINGRESP, a second CONNACK), mutated, spliced and cut anywhere.

In process, the sans-IO codec (`protocol.mqtt.Connection`, both protocol levels) must never
raise, must emit nothing after a `Violation`, only well-formed events, and the same events
however the stream is cut into reads. Over a socket, the link must never raise out of its task,
must deliver to a subscription only messages whose topic matches it, must count what it refuses
(`LinkStats`), and must come back on the next connection: the fake broker's second connection
behaves and its message is delivered.
"""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from peerd.mqtt import Backoff, BrokerSettings, Message, MqttLink, topic_matches
from protocol.mqtt import V5, V311, ConnAck, Connection, Dropped, Event, Publish, State, Violation
from protocol.mqtt.packets import varint
from tests.fuzz.corpus import _mutate, fuzz_settings
from tests.support.hostile import read_packet

FUZZ = fuzz_settings(deadline=None, share=3)  # real sockets; hangs: asyncio timeouts

FILTER = "peerd/v1/lab/in/+"
TOPIC = "peerd/v1/lab/in/fuzz"


def publish(topic: str, payload: bytes, *, qos: int = 0, mid: int = 1, dup: bool = False) -> bytes:
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + (mid.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | dup << 3 | qos << 1]) + varint(len(body)) + body


PACKETS = [
    publish(TOPIC, b"hello"),
    publish(TOPIC, b"q1", qos=1, mid=7),
    publish(TOPIC, bytes(300), qos=1, mid=8, dup=True),
    publish("peerd/v1/lab/in/other", b"x"),
    publish("peerd/v1/lab/rev/a/b", b"not subscribed", qos=1, mid=9),
    publish("peerd/v1/lab/in/+", b"wildcard in a topic name"),
    b"\x40\x02\x00\x07",  # PUBACK for a publish never sent
    b"\x90\x03\x00\x05\x00",  # SUBACK for nothing
    b"\xb0\x02\x00\x05",  # UNSUBACK
    b"\xd0\x00",  # PINGRESP
    b"\x20\x02\x00\x00",  # a second CONNACK
]


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    packets = draw(st.lists(st.sampled_from(PACKETS), min_size=1, max_size=8))
    stream = b"".join(packets)
    if draw(st.booleans()):
        stream = _mutate(stream, draw, draw(st.sampled_from(PACKETS)))
    return stream


V5_PACKETS = [
    b"\x20\x08\x00\x00\x05\x27\x00\x00\x10\x00",  # CONNACK, maximum packet size 4096
    publish(TOPIC, b"\x05\x02\x00\x00\x00\x3c" + b"with expiry"),  # properties, then payload
    b"\x40\x04\x00\x07\x97\x00",  # PUBACK with a reason and empty properties
    b"\x90\x04\x00\x05\x00\x80",  # SUBACK with properties
    b"\xb0\x04\x00\x05\x00\x00",  # UNSUBACK with properties and a reason
    b"\xe0\x03\x95\x01\x00",  # DISCONNECT, packet too large (a truncated property)
    b"\xe0\x00",
]


def _feed(version: int, stream: bytes, cuts: list[int]) -> tuple[list[Event], Connection]:
    conn = Connection(version=version, max_packet_size=2048)
    conn.connect(client_id="fuzz", keepalive=30)
    conn.receive_data(b"\x20\x03\x00\x00\x00" if version == V5 else b"\x20\x02\x00\x00")
    at = 0
    for cut in [*sorted(cuts), len(stream)]:
        if cut > at:
            conn.receive_data(stream[at:cut])
            at = cut
    out: list[Event] = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out, conn


@FUZZ
@given(st.sampled_from([V311, V5]), streams(), st.data())
def test_codec_in_process(version: int, stream: bytes, data: st.DataObject) -> None:
    if version == V5 and data.draw(st.booleans()):
        stream = data.draw(st.sampled_from(V5_PACKETS)) + stream
    cuts = data.draw(st.lists(st.integers(0, max(0, len(stream) - 1)), max_size=6))
    whole, conn = _feed(version, stream, [])
    split, _ = _feed(version, stream, cuts)
    assert split == whole, "the events depend on how the stream was cut into reads"
    assert isinstance(whole[0], ConnAck)
    for i, ev in enumerate(whole[1:], 1):
        if isinstance(ev, Violation):
            assert i == len(whole) - 1, "events after a violation"
            assert conn.state is State.CLOSED
        elif isinstance(ev, Publish):
            assert ev.qos in (0, 1)
            assert ev.topic
            assert "+" not in ev.topic
            assert "#" not in ev.topic
            assert len(ev.payload) < 2048
        elif isinstance(ev, Dropped):
            assert ev.reason in ("oversize", "bad-topic")
    for buf in conn.data_to_send():  # only PUBACKs (and the CONNECT) go back
        assert bytes(buf[:2]) in (b"\x40\x02", b"\x10" + bytes(buf[1:2]))


async def _scenario(stream: bytes) -> list[Message]:
    delivered: list[Message] = []
    connections = 0
    second_done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            await read_packet(reader)  # CONNECT
            writer.write(b"\x20\x02\x00\x00")
            while True:
                first, body = await read_packet(reader)
                if first >> 4 == 8:  # SUBSCRIBE: acknowledge it at QoS 1
                    writer.write(b"\x90\x03" + body[:2] + b"\x01")
                    break
            if connections == 1:
                writer.write(stream)
                await writer.drain()
                await asyncio.sleep(0.01)
            else:
                writer.write(publish(TOPIC, b"after"))
                await writer.drain()
                second_done.set()
                await reader.read()  # until the link closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings_ = BrokerSettings.from_url(f"mqtt://127.0.0.1:{port}", client_id="fuzz")
    link = MqttLink(settings_, backoff=Backoff(initial=0.001, maximum=0.001))
    try:
        async with asyncio.timeout(20):
            task = asyncio.create_task(link.run())
            await link.subscribe(FILTER, qos=1, handler=delivered.append)
            await second_done.wait()
            while not any(m.payload == b"after" for m in delivered):  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        assert not task.done(), "the link task ended"
    finally:
        await link.close()
        server.close()
        await server.wait_closed()
    assert task.done()
    assert task.exception() is None
    assert all(topic_matches(FILTER, m.topic) for m in delivered), delivered
    stats = link.stats
    assert stats.received >= len(delivered)
    assert stats.handler_errors == 0
    return delivered


@FUZZ
@given(streams())
def test_hostile_broker_byte_stream(stream: bytes) -> None:
    asyncio.run(_scenario(stream))


def test_a_valid_stream_is_delivered_in_full() -> None:
    """The check that makes the fuzz meaningful: unmutated packets do arrive."""
    stream = PACKETS[0] + PACKETS[1] + PACKETS[3] + PACKETS[4]
    delivered = asyncio.run(_scenario(stream))
    assert [m.payload for m in delivered] == [b"hello", b"q1", b"x", b"after"]
