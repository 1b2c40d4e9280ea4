"""The hostile-broker proxy (tests/support/hostile.py) does what each action says.

Clients are aiomqtt (independent of peerd's own MQTT code) against a real Mosquitto, except the
byte-exactness test, which needs raw sockets, and the threaded test, which drives the proxy from
a sync test with mosquitto_pub/mosquitto_sub subprocesses as daemons would be.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import aiomqtt
import pytest

from peerd.mqtt import Backoff, BrokerSettings, MqttLink
from tests.support.broker import Broker
from tests.support.hostile import (
    TO_BROKER,
    TO_CLIENT,
    BitFlip,
    Delay,
    Drop,
    Duplicate,
    Hold,
    HostileProxy,
    Mutate,
    Record,
    SwapAdjacent,
    Truncate,
)

PAYLOADS = [f"message {i}".encode() for i in range(6)]


@asynccontextmanager
async def client(port: int, name: str) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", port, identifier=name + os.urandom(4).hex()) as c:
        yield c


async def collect(
    c: aiomqtt.Client, expect: int, quiet: float = 0.3, limit: float = 10.0
) -> list[aiomqtt.Message]:
    """The `expect` messages (waiting up to `limit` s for each), then any more that arrive
    until `quiet` s pass without one."""
    got: list[aiomqtt.Message] = []
    it = c.messages.__aiter__()
    while True:
        try:
            async with asyncio.timeout(limit if len(got) < expect else quiet):
                got.append(await it.__anext__())
        except TimeoutError:
            return got


def payloads(msgs: list[aiomqtt.Message]) -> list[bytes]:
    return [bytes(m.payload) for m in msgs]  # type: ignore[arg-type]


def topic() -> str:
    return f"peerd/v1/t/x/{os.urandom(6).hex()}"


@pytest.fixture
async def proxy(shared_broker: Broker) -> AsyncIterator[HostileProxy]:
    async with HostileProxy(shared_broker.port, seed=7) as p:
        yield p


@asynccontextmanager
async def pair(
    proxy: HostileProxy, broker: Broker, *, sub_via_proxy: bool, t: str, qos: int = 1
) -> AsyncIterator[tuple[aiomqtt.Client, aiomqtt.Client]]:
    """A publisher and a subscriber on `t`; one of them goes through the proxy."""
    async with AsyncExitStack() as stack:
        pub = await stack.enter_async_context(
            client(broker.port if sub_via_proxy else proxy.port, "pub")
        )
        sub = await stack.enter_async_context(
            client(proxy.port if sub_via_proxy else broker.port, "sub")
        )
        await sub.subscribe(t, qos=qos)
        yield pub, sub


# --- pass-through ------------------------------------------------------------------------------


async def test_unmatched_traffic_passes_byte_for_byte() -> None:
    """Arbitrary MQTT packets, split at random points, arrive exactly as sent, both ways."""
    received: list[bytes] = []
    server_writer: list[asyncio.StreamWriter] = []
    done = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_writer.append(writer)
        while data := await reader.read(65536):
            received.append(data)
        done.set()

    rng = random.Random(3)

    def publish(first: int, mid: bytes, payload: bytes) -> bytes:
        body = b"\x00\x03a/b" + mid + payload
        n = len(body)
        length = bytes([n]) if n < 128 else bytes([(n & 0x7F) | 0x80, n >> 7])
        return bytes([first]) + length + body

    packets = [
        b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd",  # CONNECT
        b"\x82\x08\x00\x01\x00\x03a/b\x01",  # SUBSCRIBE
        publish(0x3B, b"\x00\x07", os.urandom(200)),  # QoS 1, retained, DUP
        publish(0x30, b"", b""),  # empty payload
        publish(0x32, b"\x00\x08", os.urandom(5000)),
        b"\xc0\x00",
        b"\xe0\x00",
    ]
    stream = b"".join(packets)
    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    async with HostileProxy(server.sockets[0].getsockname()[1]) as proxy:
        proxy.add_rule(TO_BROKER, "other/topic", Drop())  # rules exist but do not match
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        pos = 0
        while pos < len(stream):
            n = rng.randint(1, 40)
            writer.write(stream[pos : pos + n])
            await writer.drain()
            await asyncio.sleep(0)
            pos += n
        await proxy.wait_connections(1)
        async with asyncio.timeout(5):
            while not server_writer:  # noqa: ASYNC110 - filled by the server's callback
                await asyncio.sleep(0.01)
        back = b"\x20\x02\x00\x00" + b"\x30\x06\x00\x02c/d!" + b"\xd0\x00"
        server_writer[0].write(back)
        async with asyncio.timeout(5):
            echoed = await reader.readexactly(len(back))
        writer.close()
        async with asyncio.timeout(5):
            await done.wait()
    server.close()
    assert b"".join(received) == stream
    assert echoed == back
    assert proxy.stats["publish_to_broker"] == 3
    assert proxy.stats["publish_to_client"] == 1


async def test_records_client_ids_and_passes_qos_and_retain(
    proxy: HostileProxy, shared_broker: Broker
) -> None:
    t = topic()
    proxy.add_rule("both", t, Record())
    async with pair(proxy, shared_broker, sub_via_proxy=True, t=t) as (pub, sub):
        await pub.publish(t, b"one", qos=1)
        await pub.publish(t, b"zero", qos=0)
        got = await collect(sub, 2)
    assert payloads(got) == [b"one", b"zero"]
    assert [m.qos for m in got] == [1, 0]
    rec = proxy.recordings(t, TO_CLIENT)
    assert [(p.payload, p.qos) for p in rec] == [(b"one", 1), (b"zero", 0)]
    assert rec[0].client_id is not None
    assert rec[0].client_id.startswith("sub")
    assert rec[0].mid is not None


# --- each action -------------------------------------------------------------------------------


async def test_drop_towards_the_broker_acks_the_sender(
    proxy: HostileProxy, shared_broker: Broker
) -> None:
    t = topic()
    rule = proxy.add_rule(TO_BROKER, t, Drop(), where=lambda p: p.payload in PAYLOADS[1:4:2])
    async with pair(proxy, shared_broker, sub_via_proxy=False, t=t) as (pub, sub):
        for p in PAYLOADS[:5]:
            await pub.publish(t, p, qos=1, timeout=5)  # each completes: the drops were acked
        got = await collect(sub, 3)
    assert payloads(got) == [PAYLOADS[0], PAYLOADS[2], PAYLOADS[4]]
    assert rule.applied == 2
    assert proxy.stats["dropped"] == 2
    assert proxy.stats["acked"] == 2


async def test_drop_towards_the_client_acks_the_broker_so_delivery_goes_on(
    proxy: HostileProxy, shared_broker: Broker
) -> None:
    t = topic()
    # More than Mosquitto's 20 in-flight messages: without the proxy's PUBACKs it would stall.
    proxy.add_rule(TO_CLIENT, t, Drop(), count=30)
    async with pair(proxy, shared_broker, sub_via_proxy=True, t=t) as (pub, sub):
        for i in range(31):
            await pub.publish(t, f"m{i}".encode(), qos=1)
        got = await collect(sub, 1)
    assert payloads(got) == [b"m30"]
    assert proxy.stats["acked"] == 30


async def test_delay_lets_later_packets_overtake(
    proxy: HostileProxy, shared_broker: Broker
) -> None:
    t = topic()
    proxy.add_rule(TO_CLIENT, t, Delay(1.5), count=1)
    async with pair(proxy, shared_broker, sub_via_proxy=True, t=t) as (pub, sub):
        for p in PAYLOADS[:3]:
            await pub.publish(t, p, qos=1)
        got = await collect(sub, 3)
    assert payloads(got) == [PAYLOADS[1], PAYLOADS[2], PAYLOADS[0]]
    assert proxy.stats["delayed"] == 1


async def test_duplicate(proxy: HostileProxy, shared_broker: Broker) -> None:
    t = topic()
    proxy.add_rule(TO_CLIENT, t, Duplicate(copies=2), skip=1, count=1)
    async with pair(proxy, shared_broker, sub_via_proxy=True, t=t) as (pub, sub):
        for p in PAYLOADS[:3]:
            await pub.publish(t, p, qos=1)
        got = await collect(sub, 5)
    assert payloads(got) == [PAYLOADS[0], PAYLOADS[1], PAYLOADS[1], PAYLOADS[1], PAYLOADS[2]]
    assert [m.qos for m in got] == [1, 1, 0, 0, 1]  # copies at QoS 0: no packet id reused
    assert proxy.stats["duplicated"] == 2


async def test_hold_and_release_in_reverse(proxy: HostileProxy, shared_broker: Broker) -> None:
    t = topic()
    rule = proxy.add_rule(TO_CLIENT, t, Hold())
    async with pair(proxy, shared_broker, sub_via_proxy=True, t=t) as (pub, sub):
        for p in PAYLOADS[:4]:
            await pub.publish(t, p, qos=1)
        assert await collect(sub, 0) == []
        assert len(rule.held) == 4
        proxy.remove_rule(rule)
        assert proxy.release(rule, order="reverse") == 4
        got = await collect(sub, 4)
    assert payloads(got) == PAYLOADS[:4][::-1]


async def test_swap_adjacent(proxy: HostileProxy, shared_broker: Broker) -> None:
    t = topic()
    proxy.add_rule(TO_CLIENT, t, SwapAdjacent())
    async with pair(proxy, shared_broker, sub_via_proxy=True, t=t) as (pub, sub):
        for p in PAYLOADS[:5]:
            await pub.publish(t, p, qos=1)
        got = await collect(sub, 5)  # the fifth waits for its (1 s) timeout
    assert payloads(got) == [PAYLOADS[i] for i in (1, 0, 3, 2, 4)]
    assert proxy.stats["swapped"] == 2


async def test_bit_flips_at_given_and_random_positions(
    proxy: HostileProxy, shared_broker: Broker
) -> None:
    t = topic()
    original = os.urandom(1000)
    proxy.add_rule(TO_CLIENT, t, BitFlip(positions=[0, -1], bit=7), count=1)
    proxy.add_rule(TO_CLIENT, t, BitFlip(count=3), skip=1, count=1)
    async with pair(proxy, shared_broker, sub_via_proxy=True, t=t) as (pub, sub):
        await pub.publish(t, original, qos=1)
        await pub.publish(t, original, qos=1)
        await pub.publish(t, original, qos=1)
        got = payloads(await collect(sub, 3))
    assert got[0] == bytes([original[0] ^ 0x80]) + original[1:-1] + bytes([original[-1] ^ 0x80])
    flipped = sum(bin(a ^ b).count("1") for a, b in zip(got[1], original, strict=True))
    assert 1 <= flipped <= 3  # three flips (two may hit the same bit and cancel)
    assert got[1] != original
    assert got[2] == original
    assert proxy.stats["flipped"] == 5


async def test_truncate_keeps_the_stream_valid(proxy: HostileProxy, shared_broker: Broker) -> None:
    t = topic()
    body = os.urandom(300)
    proxy.add_rule(TO_CLIENT, t, Truncate(keep=10), count=1)
    proxy.add_rule(TO_CLIENT, t, Truncate(cut=7), skip=1, count=1)  # rules chain: skip the first
    async with pair(proxy, shared_broker, sub_via_proxy=True, t=t) as (pub, sub):
        for _ in range(3):
            await pub.publish(t, body, qos=1)
        got = payloads(await collect(sub, 3))
    assert got == [body[:10], body[:-7], body]


async def test_mutate(proxy: HostileProxy, shared_broker: Broker) -> None:
    t = topic()
    proxy.add_rule(TO_BROKER, t, Mutate(lambda b: b[::-1]))
    async with pair(proxy, shared_broker, sub_via_proxy=False, t=t) as (pub, sub):
        await pub.publish(t, b"abc", qos=1)
        assert payloads(await collect(sub, 1)) == [b"cba"]


async def test_swap_payloads_between_two_topics(proxy: HostileProxy, shared_broker: Broker) -> None:
    ta, tb = topic(), topic()
    proxy.swap_payloads(TO_CLIENT, ta, tb, count=1)
    async with client(shared_broker.port, "pub") as pub, client(proxy.port, "sub") as sub:
        await sub.subscribe(ta, qos=1)
        await sub.subscribe(tb, qos=1)
        await pub.publish(ta, b"chunk of A", qos=1)
        await pub.publish(tb, b"chunk of B", qos=1)
        await pub.publish(ta, b"next of A", qos=1)
        got = await collect(sub, 3)
    assert [(str(m.topic), bytes(m.payload)) for m in got] == [  # type: ignore[arg-type]
        (ta, b"chunk of B"),
        (tb, b"chunk of A"),
        (ta, b"next of A"),
    ]


async def test_inject_forged_packets_both_ways(proxy: HostileProxy, shared_broker: Broker) -> None:
    t = topic()
    async with client(proxy.port, "victim") as victim, client(shared_broker.port, "obs") as obs:
        await victim.subscribe(t, qos=1)
        await obs.subscribe(t, qos=1)
        await proxy.wait_connections(1)
        assert proxy.inject(TO_CLIENT, t, b"forged for the victim") == 1
        assert payloads(await collect(victim, 1)) == [b"forged for the victim"]
        assert await collect(obs, 0) == []  # the broker never saw it
        # Toward the broker: it arrives as if the victim had published it.
        assert proxy.inject(TO_BROKER, t, b"forged as the victim") == 1
        assert payloads(await collect(obs, 1)) == [b"forged as the victim"]
    assert proxy.stats["injected"] == 2


async def test_replay_within_and_across_sessions_and_after_a_broker_restart(
    broker: Broker,
) -> None:
    t = topic()
    async with HostileProxy(broker.port) as proxy:
        proxy.add_rule(TO_CLIENT, t, Record())
        async with client(broker.port, "pub") as pub, client(proxy.port, "sub") as sub:
            await sub.subscribe(t, qos=1)
            await pub.publish(t, b"original", qos=1)
            assert payloads(await collect(sub, 1)) == [b"original"]
            recorded = proxy.recordings(t)
            assert proxy.replay(recorded) == 1  # within the session
            assert payloads(await collect(sub, 1)) == [b"original"]
        # Across sessions: the client reconnects (same id) and gets it again.
        cid = recorded[0].client_id
        assert cid is not None
        async with aiomqtt.Client("127.0.0.1", proxy.port, identifier=cid) as again:
            await proxy.wait_connections(2)
            assert proxy.replay(recorded) == 1
            assert payloads(await collect(again, 1)) == [b"original"]
        # After the broker restarted: a new connection to a new broker process.
        broker.restart()
        async with aiomqtt.Client("127.0.0.1", proxy.port, identifier=cid) as later:
            await later.subscribe("peerd/v1/t/probe")  # wait until it is really up
            assert proxy.replay(recorded) == 1
            assert payloads(await collect(later, 1)) == [b"original"]
        # And toward the broker, as the recorded client: observers see it.
        async with (
            client(broker.port, "obs") as obs,
            aiomqtt.Client("127.0.0.1", proxy.port, identifier=cid),
        ):
            await obs.subscribe(t, qos=1)
            await proxy.wait_connections(4)
            assert proxy.replay(recorded, direction=TO_BROKER) == 1
            assert payloads(await collect(obs, 1)) == [b"original"]


async def test_kill_connections_and_refuse_new_ones(proxy: HostileProxy) -> None:
    states: list[bool] = []
    s = BrokerSettings.from_url(proxy.url, client_id="killed" + os.urandom(4).hex())
    async with MqttLink(s, on_state=states.append, backoff=Backoff(0.02, 0.05)) as link:
        await link.wait_connected(5)
        proxy.refuse_connections = True
        assert proxy.kill_connections() == 1
        async with asyncio.timeout(5):
            while proxy.stats["refused"] < 2:  # noqa: ASYNC110 - a counter of the proxy
                await asyncio.sleep(0.01)
        assert not link.connected
        proxy.refuse_connections = False
        await link.wait_connected(5)
    assert states[:3] == [True, False, True]
    assert proxy.stats["killed"] == 1


async def test_packets_of_a_client_only(proxy: HostileProxy, shared_broker: Broker) -> None:
    t = topic()
    async with client(proxy.port, "a") as a, client(proxy.port, "b") as b:
        await a.subscribe(t, qos=1)
        await b.subscribe(t, qos=1)
        await proxy.wait_connections(2)
        a_id = next(s.client_id for s in proxy._sessions.values() if s.client_id.startswith("a"))  # type: ignore[union-attr]
        proxy.add_rule(TO_CLIENT, t, Drop(), client=a_id)
        async with client(shared_broker.port, "pub") as pub:
            await pub.publish(t, b"x", qos=1)
        assert await collect(a, 0) == []
        assert payloads(await collect(b, 1)) == [b"x"]


# --- from a sync test, with daemon-like subprocesses ----------------------------------------


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="needs mosquitto-clients")
def test_threaded_proxy_from_a_sync_test(shared_broker: Broker) -> None:
    t = topic()
    with HostileProxy(shared_broker.port) as proxy:
        proxy.add_rule(TO_CLIENT, t, Mutate(lambda b: b.upper()))
        sub = subprocess.Popen(
            ["mosquitto_sub", "-p", str(proxy.port), "-t", t, "-C", "1", "-q", "1", "-W", "10"],
            stdout=subprocess.PIPE,
        )
        proxy.wait_connections_blocking(1)
        # Publish until one gets through: the subscriber's SUBSCRIBE may still be on its way.
        for _ in range(50):
            subprocess.run(
                ["mosquitto_pub", "-p", str(shared_broker.port), "-t", t, "-m", "quiet", "-q", "1"],
                check=True,
            )
            if proxy.stats["mutated"]:
                break
            time.sleep(0.1)
        out, _ = sub.communicate(timeout=10)
    assert out.strip() == b"QUIET"
