"""The MQTT link against a real Mosquitto: delivery, reconnects, bounds, backoff, TLS, auth.

Hostile-broker behaviour (malformed packets, refusals the broker may send) is tested against a
small scripted TCP server that speaks just enough MQTT, since Mosquitto never misbehaves.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.errors import ConfigError, PeerdError
from peerd.mqtt import (
    Backoff,
    BrokerError,
    BrokerQueueFull,
    BrokerRefused,
    BrokerSettings,
    BrokerSettingsError,
    BrokerTimeout,
    BrokerTlsError,
    LinkClosed,
    Message,
    MqttLink,
    SubscribeRefused,
    Topics,
    statement_id,
    topic_matches,
)
from peerd.mqtt.subscription import LinkStats, Routes, Subscription
from tests.support.broker import Broker, free_port, write_password_file
from tests.support.hostile import TO_BROKER, Hold, HostileProxy, Record, read_packet
from tests.support.tls import issue, make_ca


def cid(prefix: str) -> str:
    """A client id unique to this test (tests share one broker)."""
    return (prefix + os.urandom(6).hex())[:23]


def link_for(broker: Broker, prefix: str, **kw: object) -> MqttLink:
    backoff = kw.pop("backoff", Backoff(initial=0.02, maximum=0.2))
    assert isinstance(backoff, Backoff)
    return MqttLink(
        BrokerSettings.from_url(broker.url, client_id=cid(prefix)), backoff=backoff, **kw
    )  # type: ignore[arg-type]


async def eventually(pred: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Poll a condition other tasks make true; fail (naming it) if it takes over `limit` s."""
    try:
        async with asyncio.timeout(limit):
            while not pred():  # noqa: ASYNC110 - counters of the link have no event to wait on
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out waiting for: {what}")


async def next_msg(sub: AsyncIterator[Message], limit: float = 5.0) -> Message:
    async with asyncio.timeout(limit):
        return await anext(sub)


# --- settings, backoff, topics (no broker) --------------------------------------------------------


def test_from_url_parses_schemes_ports_and_credentials(tmp_path: Path) -> None:
    s = BrokerSettings.from_url("mqtt://broker.example", client_id="node1")
    assert (s.host, s.port, s.tls, s.username) == ("broker.example", 1883, False, None)
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    s = BrokerSettings.from_url("MQTTS://[::1]", client_id="node1", ca_file=ca)
    assert (s.host, s.port, s.tls, s.ca_file) == ("::1", 8883, True, ca)
    assert s.url == "mqtts://[::1]:8883"
    s = BrokerSettings.from_url("mqtt://us%40er:p%3Ass@h:1999/", client_id="n")
    assert (s.username, s.password, s.port) == ("us@er", "p:ss", 1999)
    assert "p:ss" not in repr(s)
    assert s.url == "mqtt://h:1999"


@pytest.mark.parametrize(
    ("url", "kwargs", "message"),
    [
        ("http://h", {}, "use mqtt://host:port"),
        ("mqtt://", {}, "names no host"),
        ("mqtt://h:99999", {}, "invalid broker URL"),
        ("mqtt://h:0", {}, "invalid broker port"),
        ("mqtt://h/path", {}, "must not have a path"),
        ("mqtt://h?x=1", {}, "must not have a path"),
        ("mqtt://h", {"client_id": "Node"}, "invalid MQTT client id"),
        ("mqtt://h", {"client_id": "a" * 24}, "invalid MQTT client id"),
        ("mqtt://h", {"client_id": ""}, "invalid MQTT client id"),
        ("mqtt://h", {"ca_file": "/etc/hostname"}, "needs an mqtts://"),
        ("mqtts://h", {"ca_file": "/nonexistent/ca.pem"}, "does not exist"),
        ("mqtts://h", {"key_file": "/etc/hostname"}, "needs a client certificate"),
        ("mqtt://h", {"password": "x"}, "needs a username"),
        ("mqtt://u:p@h", {"username": "v"}, "both in the URL and as options"),
        ("mqtt://h", {"keepalive": 0}, "keepalive"),
    ],
)
def test_from_url_rejects_with_a_clear_message(
    url: str, kwargs: dict[str, object], message: str
) -> None:
    kwargs = {"client_id": "node1", **kwargs}
    with pytest.raises(BrokerSettingsError, match=message) as info:
        BrokerSettings.from_url(url, **kwargs)  # type: ignore[arg-type]
    # One hierarchy: a bad broker URL is a configuration error (exit code 3) and a PeerdError.
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, PeerdError)
    assert info.value.hint


def test_error_messages_never_show_url_passwords() -> None:
    with pytest.raises(BrokerSettingsError) as info:
        BrokerSettings.from_url("ftp://user:hunter2@h", client_id="n")
    assert "hunter2" not in str(info.value)


def test_backoff_grows_within_bounds_and_resets() -> None:
    b = Backoff(initial=0.1, maximum=2.0, factor=2.0, jitter=0.5, rng=random.Random(1))
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    for ceiling in ceilings:
        d = b.next_delay()
        assert ceiling * 0.5 <= d <= ceiling
    b.reset()
    assert b.next_delay() <= 0.1


@given(
    initial=st.floats(0.001, 10),
    extra=st.floats(0, 100),
    factor=st.floats(1, 4),
    jitter=st.floats(0, 1),
    seed=st.integers(0, 2**32),
)
def test_backoff_never_exceeds_its_bounds(
    initial: float, extra: float, factor: float, jitter: float, seed: int
) -> None:
    maximum = initial + extra
    b = Backoff(
        initial=initial, maximum=maximum, factor=factor, jitter=jitter, rng=random.Random(seed)
    )
    for n in range(80):
        d = b.next_delay()
        ceiling = b.ceiling(n)
        assert ceiling <= maximum
        assert ceiling * (1 - jitter) - 1e-12 <= d <= ceiling + 1e-12


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("+/+", "a/b", True),
        ("+", "a/b", False),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/+/c", "a//c", True),
        ("a/b", "a/c", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


_LEVELS = st.sampled_from(["a", "b", "", "$SYS"])
_TOPICS = st.lists(_LEVELS, min_size=1, max_size=4).map("/".join)
_FILTERS = st.builds(
    lambda levels, tail: "/".join([*levels, *tail]),
    st.lists(st.one_of(_LEVELS, st.just("+")), min_size=0, max_size=3),
    st.sampled_from([[], ["#"], ["+"]]),
).filter(bool)


class _Owner:
    stats = LinkStats()

    def _handler_failed(self, sub: Subscription) -> None:
        raise AssertionError("a handler failed")

    async def _unsubscribe(self, sub: Subscription) -> None:
        raise AssertionError("not here")


@settings(max_examples=300, deadline=None)
@given(filters=st.lists(_FILTERS, min_size=1, max_size=6), topics=st.lists(_TOPICS, max_size=8))
def test_routes_reach_exactly_the_subscriptions_whose_filter_matches(
    filters: list[str], topics: list[str]
) -> None:
    """The link's routing (an exact lookup, a prefix test for `.../#`, `topic_matches` for the
    rest) delivers a topic to the subscriptions `topic_matches` says, in subscription order,
    also after one is dropped."""

    async def check() -> None:
        routes = Routes()
        hits: list[int] = []
        subs = [
            Subscription(
                _Owner(),
                f,
                qos=0,
                handler=lambda m, i=i: hits.append(i),
                max_messages=1,
                max_bytes=1,
            )
            for i, f in enumerate(filters)
        ]
        for sub in subs:
            routes.add(sub)
        live = dict(enumerate(filters))
        for round_ in range(2):
            for topic in topics:
                hits.clear()
                routes.deliver(Message(topic, b"", 0, False, False), LinkStats())
                want = [i for i, f in live.items() if topic_matches(f, topic)]
                assert hits == want, (topic, live)
            if round_ == 0:
                routes.drop(subs[0])
                del live[0]

    asyncio.run(check())


def test_topic_layout_of_a_network() -> None:
    t = Topics("lab-1")
    stmt = b"\x92\x01signed statement"
    sid = hashlib.blake2b(b"peerd/v1/statement-id\0" + stmt, digest_size=32).digest()[:16].hex()
    assert statement_id(stmt) == sid
    assert t.inbox("alice1") == "peerd/v1/lab-1/in/alice1"
    assert t.revocation("alice1", stmt) == f"peerd/v1/lab-1/rev/alice1/{sid}"
    assert t.revocations == "peerd/v1/lab-1/rev/#"
    assert (
        t.transfer("alice1", bytes(range(16)))
        == "peerd/v1/lab-1/x/alice1/000102030405060708090a0b0c0d0e0f"
    )
    assert t.parse(t.inbox("bob")) == ("in", ("bob",))
    assert t.parse(t.revocation("bob", stmt)) == ("rev", ("bob", sid))
    assert t.parse(t.transfer("alice1", bytes(16))) == ("x", ("alice1", "0" * 32))
    for bad in (
        "peerd/v1/other/in/bob",
        "peerd/v1/lab-1/in/Bob",
        "peerd/v1/lab-1/in/bob/extra",
        "peerd/v1/lab-1/rev/bob/short",
        "peerd/v1/lab-1/x/" + "g" * 32,
        "peerd/v1/lab-1/y/bob",
    ):
        assert t.parse(bad) is None
    for network in ("", "a/b", "a+", "#", "$sys", "x" * 65):
        with pytest.raises(BrokerSettingsError):
            Topics(network)
    with pytest.raises(ValueError, match="peer id"):
        t.inbox("../x")
    # Every topic it builds is matched by the filters the shipped ACL uses.
    assert topic_matches("peerd/v1/+/in/+", t.inbox("bob"))
    assert topic_matches("peerd/v1/+/rev/#", t.revocation("bob", stmt))
    assert topic_matches("peerd/v1/+/x/+/+", t.transfer("alice1", bytes(16)))


# --- delivery ----------------------------------------------------------------------------------


async def test_qos0_and_qos1_round_trip(shared_broker: Broker) -> None:
    async with link_for(shared_broker, "a") as a, link_for(shared_broker, "b") as b:
        await a.wait_connected(5)
        await b.wait_connected(5)
        inbox = f"peerd/v1/t/in/{b.settings.client_id}"
        sub = await b.subscribe(inbox, qos=1, timeout=5)
        big = os.urandom(300_000)  # takes the direct-read path of the parser
        await a.publish(inbox, b"zero", qos=0)
        await a.publish(inbox, b"one", qos=1)
        await a.publish(inbox, big, qos=1)
        a.publish_nowait(inbox, b"", qos=0)
        got = [await next_msg(sub) for _ in range(4)]
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            (inbox, b"zero", 0),
            (inbox, b"one", 1),
            (inbox, big, 1),
            (inbox, b"", 0),
        ]
        assert a.stats.published == 4
        assert b.stats.received == 4


async def test_tcp_nodelay_is_set_on_the_real_socket(shared_broker: Broker) -> None:
    async with link_for(shared_broker, "nd") as link:
        await link.wait_connected(5)
        conn = link._conn
        assert conn is not None
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_retained_message_reaches_late_subscribers_and_survives_restart(
    broker: Broker,
) -> None:
    topic = "peerd/v1/t/rev/issuer/00ff"
    async with link_for(broker, "issuer") as issuer:
        await issuer.wait_connected(5)
        await issuer.publish(topic, b"revoked", qos=1, retain=True)
    broker.stop()  # graceful: Mosquitto saves its database
    broker.start()
    async with link_for(broker, "late") as late:
        sub = await late.subscribe("peerd/v1/t/rev/#", timeout=5)
        msg = await next_msg(sub)
        assert (msg.topic, msg.payload, msg.retain) == (topic, b"revoked", True)


async def test_pipeline_keeps_order_and_waits_for_every_ack(shared_broker: Broker) -> None:
    async with link_for(shared_broker, "pp") as a, link_for(shared_broker, "pq") as b:
        topic = f"peerd/v1/t/x/{os.urandom(8).hex()}"
        sub = await b.subscribe(topic, max_messages=500, timeout=5)
        await a.wait_connected(5)
        async with a.pipeline(8) as pipe:
            for i in range(300):
                await pipe.publish(topic, i.to_bytes(4, "big") * 100)
                assert pipe.sent - pipe.acknowledged <= 8
        assert pipe.acknowledged == pipe.sent == 300
        assert a.unacked == 0
        got = [await next_msg(sub) for _ in range(300)]
        assert [int.from_bytes(m.payload[:4], "big") for m in got] == list(range(300))


async def test_unsubscribe_stops_delivery_but_not_for_other_subscribers(
    shared_broker: Broker,
) -> None:
    async with link_for(shared_broker, "us") as link:
        topic = f"peerd/v1/t/x/{os.urandom(8).hex()}"
        first = await link.subscribe(topic, timeout=5)
        second = await link.subscribe(topic, timeout=5)
        await link.publish(topic, b"1", qos=1)
        assert (await next_msg(first)).payload == (await next_msg(second)).payload == b"1"
        await first.close()
        await link.publish(topic, b"2", qos=1)
        assert (await next_msg(second)).payload == b"2"
        assert len(first) == 0
        assert first.closed
        await second.close()
        assert topic not in link.subscriptions
        received = link.stats.received
        await link.publish(topic, b"3", qos=1)
        # The broker forgot the subscription: nothing comes back, not even an unsolicited copy.
        probe = await link.subscribe(f"{topic}/probe", timeout=5)
        await link.publish(f"{topic}/probe", b"p", qos=1)
        await next_msg(probe)
        assert link.stats.received == received + 1


# --- outages -----------------------------------------------------------------------------------


async def test_broker_killed_and_restarted_link_recovers_and_delivers(broker: Broker) -> None:
    states: list[bool] = []
    async with link_for(broker, "node", on_state=states.append) as node:
        inbox = f"peerd/v1/t/in/{node.settings.client_id}"
        sub = await node.subscribe(inbox, timeout=5)
        await node.publish(inbox, b"before", qos=1)
        assert (await next_msg(sub)).payload == b"before"

        broker.kill()
        await eventually(lambda: not node.connected, "the link saw the drop")
        # Issued during the outage: they wait in the outbox and go out after the restart - after
        # the subscription was restored, so they come back to us (a clean session forgot it).
        during_qos1 = asyncio.create_task(node.publish(inbox, b"during-1", qos=1))
        await eventually(lambda: node.queued == 1, "the QoS 1 publish is queued")
        node.publish_nowait(inbox, b"during-0", qos=0)
        await asyncio.sleep(0.3)
        assert not during_qos1.done()
        assert node.queued == 2

        broker.start()
        async with asyncio.timeout(10):
            await during_qos1
        assert [(await next_msg(sub)).payload for _ in range(2)] == [b"during-1", b"during-0"]
        assert states[:3] == [True, False, True]
        assert node.stats.connects >= 2
        assert node.stats.disconnects >= 1

        async with link_for(broker, "peer") as peer:  # and others reach the restored inbox
            await peer.wait_connected(5)
            await peer.publish(inbox, b"after", qos=1)
            assert (await next_msg(sub)).payload == b"after"


async def test_an_unacknowledged_qos1_publish_is_sent_again_after_a_reconnect(
    shared_broker: Broker,
) -> None:
    topic = f"peerd/v1/t/x/{os.urandom(8).hex()}"
    async with HostileProxy(shared_broker.port) as proxy:
        swallow = proxy.add_rule(TO_BROKER, topic, Hold(), count=1)  # the broker never sees it
        proxy.add_rule(TO_BROKER, topic, Record())
        s = BrokerSettings.from_url(proxy.url, client_id=cid("rt"))
        async with (
            MqttLink(s, backoff=Backoff(initial=0.02, maximum=0.05)) as link,
            link_for(shared_broker, "ob") as observer,
        ):
            sub = await observer.subscribe(topic, timeout=5)
            sending = asyncio.create_task(link.publish(topic, b"must arrive", qos=1))
            await eventually(lambda: len(swallow.held) == 1, "the proxy swallowed it")
            await asyncio.sleep(0.2)
            assert not sending.done()  # no PUBACK: the link keeps it
            proxy.kill_connections()
            async with asyncio.timeout(10):
                await sending
            assert (await next_msg(sub)).payload == b"must arrive"
            assert link.stats.retransmitted == 1
            again = proxy.recordings(topic, TO_BROKER)
            assert len(again) == 1
            assert again[0].dup
            assert again[0].mid == swallow.held[0].mid  # same packet id, DUP set (MQTT 4.4)


async def test_outbox_is_bounded_and_a_publish_timeout_withdraws(tmp_path: Path) -> None:
    settings_ = BrokerSettings.from_url(f"mqtt://127.0.0.1:{free_port()}", client_id=cid("ob"))
    async with MqttLink(
        settings_, max_queued=3, backoff=Backoff(initial=0.05, maximum=0.1)
    ) as link:
        for i in range(3):
            link.publish_nowait("peerd/v1/t/in/x", bytes([i]), qos=1)
        with pytest.raises(BrokerQueueFull, match="already wait"):
            link.publish_nowait("peerd/v1/t/in/x", b"one too many", qos=1)
        with pytest.raises(BrokerQueueFull):
            await link.publish("peerd/v1/t/in/x", b"one too many", qos=0)
        assert link.queued == 3
    settings_ = BrokerSettings.from_url(f"mqtt://127.0.0.1:{free_port()}", client_id=cid("ob"))
    async with MqttLink(settings_, max_queued_bytes=100) as link:
        with pytest.raises(BrokerTimeout, match=r"not acknowledged within 0\.2s"):
            await link.publish("peerd/v1/t/in/x", b"x" * 60, qos=1, timeout=0.2)
        assert link.queued == 0  # withdrawn, so its bytes no longer count
        link.publish_nowait("peerd/v1/t/in/x", b"y" * 60, qos=1)
        with pytest.raises(BrokerQueueFull):
            link.publish_nowait("peerd/v1/t/in/x", b"z" * 60, qos=1)


async def test_close_flushes_qos0_publishes_already_written(broker: Broker) -> None:
    topic = f"peerd/v1/t/x/{os.urandom(8).hex()}"
    async with link_for(broker, "rcv") as receiver:
        sub = await receiver.subscribe(topic, qos=0, max_messages=512, max_bytes=1 << 30, timeout=5)
        sender = link_for(broker, "snd")
        await sender.__aenter__()
        await sender.wait_connected(5)
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)  # nothing drains: what is written stays buffered
        try:
            sent = []
            conn = sender._conn
            assert conn is not None
            assert conn.transport is not None
            while conn.transport.get_write_buffer_size() == 0:  # past the kernel's buffers
                sent.append(os.urandom(256 * 1024))
                await sender.publish(topic, sent[-1], qos=0)  # returns: written, not sent
            closing = asyncio.create_task(sender.close())
            await asyncio.sleep(0.2)
            assert not closing.done()  # it waits for the buffer to go out
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        async with asyncio.timeout(10):
            await closing
        got = [(await next_msg(sub)).payload for _ in sent]
    assert got == sent


async def test_close_fails_waiting_publishes_and_ends_subscriptions(broker: Broker) -> None:
    link = link_for(broker, "cl")
    async with link:
        sub = await link.subscribe("peerd/v1/t/in/cl", timeout=5)
        broker.kill()
        await eventually(lambda: not link.connected, "link saw the drop")
        waiting = asyncio.create_task(link.publish("peerd/v1/t/in/cl", b"x", qos=1))
        await asyncio.sleep(0.05)
    with pytest.raises(LinkClosed):
        await waiting
    assert [m async for m in sub] == []
    with pytest.raises(LinkClosed):
        link.publish_nowait("peerd/v1/t/in/cl", b"x")
    with pytest.raises(LinkClosed):
        await link.wait_connected(1)


class RecordingBackoff(Backoff):
    """The real backoff, remembering each delay it chose (and the ceiling it was bound by)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.chosen: list[tuple[int, float]] = []

    def next_delay(self) -> float:
        attempt = self.attempt
        d = super().next_delay()
        self.chosen.append((attempt, d))
        return d


async def test_reconnect_backoff_respects_bounds_and_resets_after_a_connect(
    tmp_path: Path,
) -> None:
    backoff = RecordingBackoff(initial=0.01, maximum=0.08, factor=2, jitter=0.5)
    broker = Broker(tmp_path / "b")  # not started: nothing listens yet
    settings_ = BrokerSettings.from_url(broker.url, client_id=cid("bo"))
    try:
        async with MqttLink(settings_, backoff=backoff) as link:
            await eventually(lambda: len(backoff.chosen) >= 8, "eight failed attempts")
            assert link.stats.connect_failures >= 8
            for attempt, d in backoff.chosen:
                ceiling = min(0.08, 0.01 * 2**attempt)
                assert ceiling * 0.5 <= d <= ceiling
            assert [a for a, _ in backoff.chosen[:8]] == list(range(8))
            assert max(d for _, d in backoff.chosen) > 0.04  # it did grow to the cap

            broker.start()
            await link.wait_connected(5)
            before = len(backoff.chosen)
            broker.kill()
            await eventually(lambda: len(backoff.chosen) > before, "a reconnect attempt")
            assert backoff.chosen[before][0] == 0  # the sequence started over
    finally:
        broker.close()


# --- bounded input -----------------------------------------------------------------------------


async def test_flood_is_dropped_and_counted_beyond_the_queue_bound(tmp_path: Path) -> None:
    # Mosquitto itself drops QoS 0 for a client more than max_queued_messages behind; with no
    # limit every message reaches the link, so the counts below are exact.
    with Broker(tmp_path / "b", extra_conf="max_queued_messages 0\n") as broker:
        await flood_and_count(broker)


async def flood_and_count(shared_broker: Broker) -> None:
    async with link_for(shared_broker, "fl") as victim, link_for(shared_broker, "fr") as rogue:
        inbox = f"peerd/v1/t/in/{victim.settings.client_id}"
        sub = await victim.subscribe(inbox, qos=0, max_messages=100, timeout=5)
        other = await victim.subscribe(f"{inbox}/other", qos=1, timeout=5)
        await rogue.wait_connected(5)
        for i in range(5000):
            await rogue.publish(inbox, i.to_bytes(4, "big") * 16, qos=0)
        await eventually(lambda: sub.received == 5000, "the whole flood arrived", limit=30)
        assert len(sub) == 100
        assert sub.dropped == 4900
        assert victim.stats.dropped_queue_full == 4900
        # The queue keeps the oldest; the others were counted, not stored.
        first = [int.from_bytes(sub.get_nowait().payload[:4], "big") for _ in range(100)]  # type: ignore[union-attr]
        assert first == list(range(100))
        # A flood on one subscription does not starve another.
        await rogue.publish(f"{inbox}/other", b"still here", qos=1)
        assert (await next_msg(other)).payload == b"still here"


async def test_queue_bound_in_bytes(shared_broker: Broker) -> None:
    async with link_for(shared_broker, "by") as link:
        topic = f"peerd/v1/t/x/{os.urandom(8).hex()}"
        sub = await link.subscribe(topic, max_bytes=100_000, timeout=5)
        for _ in range(20):
            await link.publish(topic, os.urandom(10_000), qos=1)
        await eventually(lambda: sub.received == 20, "all arrived")
        assert len(sub) == 10
        assert sub.dropped == 10


async def test_handler_is_called_synchronously_and_its_errors_are_counted(
    shared_broker: Broker,
) -> None:
    seen: list[bytes] = []

    def handler(msg: Message) -> None:
        if msg.payload == b"boom":
            raise RuntimeError("handler bug")
        seen.append(msg.payload)

    async with link_for(shared_broker, "hd") as link:
        topic = f"peerd/v1/t/x/{os.urandom(8).hex()}"
        sub = await link.subscribe(topic, handler=handler, timeout=5)
        for p in (b"1", b"boom", b"2"):
            await link.publish(topic, p, qos=1)
        await eventually(lambda: len(seen) == 2, "both good messages handled")
        assert seen == [b"1", b"2"]
        assert link.stats.handler_errors == 1
        assert len(sub) == 0
        assert link.connected


@pytest.mark.parametrize("version", [4, 5])
async def test_oversize_message_is_dropped_acknowledged_and_the_link_survives(
    shared_broker: Broker, version: int
) -> None:
    """3.1.1: we skip and acknowledge what is above our limit. MQTT 5: CONNECT announced the
    limit, so the broker drops it for us (and never sends it)."""
    small = BrokerSettings.from_url(
        shared_broker.url, client_id=cid("os"), max_packet_size=65536, mqtt_version=version
    )
    async with MqttLink(small) as victim, link_for(shared_broker, "ot") as sender:
        topic = f"peerd/v1/t/in/{victim.settings.client_id}"
        sub = await victim.subscribe(topic, timeout=5)
        await sender.wait_connected(5)
        for _ in range(70):  # more than Mosquitto's in-flight window: each one must be acked
            await sender.publish(topic, os.urandom(100_000), qos=1)
        await sender.publish(topic, b"fits", qos=1)
        assert (await next_msg(sub, limit=10)).payload == b"fits"
        assert victim.stats.dropped_oversize == 70
        assert victim.limits.version == version
        assert victim.stats.connects == 1
        assert victim.stats.protocol_errors == 0


# --- TLS and authentication --------------------------------------------------------------------


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[dict[str, object]]:
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, ca_cert, ca_key = make_ca(certs, "peerd-test-ca")
    crt, key = issue(certs, "broker", ca_cert, ca_key, server=True)
    client_crt, client_key = issue(certs, "node", ca_cert, ca_key, server=False)
    other_ca, _, _ = make_ca(certs, "someone-else")
    tls_port = free_port()
    mtls_port = free_port()
    extra = (
        f"listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {crt}\nkeyfile {key}\n"
        f"listener {mtls_port} 127.0.0.1\ncafile {ca}\ncertfile {crt}\nkeyfile {key}\n"
        "require_certificate true\n"
    )
    with Broker(tmp_path / "broker", extra_conf=extra) as broker:
        yield {
            "broker": broker,
            "tls_url": f"mqtts://127.0.0.1:{tls_port}",
            "mtls_url": f"mqtts://127.0.0.1:{mtls_port}",
            "ca": ca,
            "other_ca": other_ca,
            "client_crt": client_crt,
            "client_key": client_key,
        }


async def test_tls_with_ca_file_round_trips(tls_broker: dict[str, object]) -> None:
    url = str(tls_broker["tls_url"])
    s = BrokerSettings.from_url(url, client_id=cid("tls"), ca_file=tls_broker["ca"])  # type: ignore[arg-type]
    async with MqttLink(s) as link:
        sub = await link.subscribe("peerd/v1/t/in/tls", timeout=5)
        await link.publish("peerd/v1/t/in/tls", b"over tls", qos=1)
        assert (await next_msg(sub)).payload == b"over tls"
        conn = link._conn
        assert conn is not None
        assert conn.transport is not None
        assert conn.transport.get_extra_info("ssl_object") is not None
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_tls_with_the_wrong_ca_is_refused_with_a_clear_error(
    tls_broker: dict[str, object],
) -> None:
    url = str(tls_broker["tls_url"])
    s = BrokerSettings.from_url(url, client_id=cid("tls"), ca_file=tls_broker["other_ca"])  # type: ignore[arg-type]
    async with MqttLink(s) as link:
        with pytest.raises(BrokerTlsError, match=r"not trusted: .*certificate") as info:
            await link.wait_connected(30)  # raises at the first failure: retrying cannot help
    assert info.value.permanent
    assert url in str(info.value)
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


async def test_tls_client_certificate(tls_broker: dict[str, object]) -> None:
    url = str(tls_broker["mtls_url"])
    good = BrokerSettings.from_url(
        url,
        client_id=cid("mtls"),
        ca_file=tls_broker["ca"],  # type: ignore[arg-type]
        cert_file=tls_broker["client_crt"],  # type: ignore[arg-type]
        key_file=tls_broker["client_key"],  # type: ignore[arg-type]
    )
    async with MqttLink(good) as link:
        await link.wait_connected(5)
        await link.publish("peerd/v1/t/in/x", b"with a client certificate", qos=1)
    bare = BrokerSettings.from_url(url, client_id=cid("mtls"), ca_file=tls_broker["ca"])  # type: ignore[arg-type]
    async with MqttLink(bare, backoff=Backoff(initial=0.02, maximum=0.05)) as link:
        with pytest.raises(BrokerError):
            await link.wait_connected(1)
        assert not link.connected
        assert link.stats.connect_failures >= 1


async def test_username_and_password(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    write_password_file(passwd, {"node1": "right horse battery"})
    extra = f"allow_anonymous false\npassword_file {passwd}\n"
    with Broker(tmp_path / "b", extra_conf=extra) as broker:
        good = BrokerSettings.from_url(
            broker.url, client_id="node1", username="node1", password="right horse battery"
        )
        async with MqttLink(good) as link:
            await link.wait_connected(5)
            await link.publish("peerd/v1/t/in/node1", b"authenticated", qos=1)
        bad = BrokerSettings.from_url(
            broker.url, client_id="node1", username="node1", password="wrong"
        )
        async with MqttLink(bad) as link:
            with pytest.raises(
                BrokerRefused, match="refused the connection: not authorised"
            ) as info:
                await link.wait_connected(30)  # at once: retrying cannot help
        assert info.value.permanent
        assert info.value.code == 5
        anonymous = BrokerSettings.from_url(broker.url, client_id="node1")
        async with MqttLink(anonymous) as link:
            with pytest.raises(BrokerRefused):
                await link.wait_connected(30)


# --- a broker that misbehaves --------------------------------------------------------------------


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RogueBroker:
    """A TCP server that accepts CONNECT with a CONNACK, then runs a script per connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            kind, _ = await read_packet(reader)
            assert kind == 0x10
            writer.write(b"\x20\x02\x00\x00")
            await self.script(reader, writer, self.connections)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> RogueBroker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer like a broker that grants everything and delivers nothing, until the client goes."""
    while True:
        kind, body = await read_packet(reader)
        if kind == 0x82:  # SUBSCRIBE: grant each filter its requested QoS
            filters, i = [], 2
            while i < len(body):
                n = int.from_bytes(body[i : i + 2], "big")
                filters.append(body[i + 2 + n])
                i += 3 + n
            writer.write(bytes([0x90, 2 + len(filters)]) + body[:2] + bytes(filters))
        elif kind == 0xA2:
            writer.write(b"\xb0\x02" + body[:2])
        elif kind == 0xC0:
            writer.write(b"\xd0\x00")
        elif kind == 0xE0:
            return


async def test_malformed_packet_from_the_broker_is_counted_and_the_link_reconnects() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            w.write(b"\x30\xff\xff\xff\xff\x7f")  # a five-byte remaining length
        elif n == 2:
            w.write(b"\x60\x02\x00\x01")  # PUBREL: never valid towards a QoS 0/1 client
        elif n == 3:
            w.write(b"\x34\x05\x00\x01t\x00\x01")  # a QoS 2 PUBLISH
        else:
            w.write(b"\x30\x07\x00\x03t/xhi")  # fine: an unsolicited QoS 0 message
        await w.drain()
        await idle(r, w)

    async with RogueBroker(script) as rogue:
        s = BrokerSettings.from_url(rogue.url, client_id=cid("rg"))
        async with MqttLink(s, backoff=Backoff(initial=0.01, maximum=0.02)) as link:
            await eventually(lambda: rogue.connections >= 4, "three reconnects")
            await eventually(lambda: link.stats.dropped_unsolicited == 1, "the valid one counted")
            assert link.stats.protocol_errors == 3
            assert link.connected


async def test_subscription_refused_by_the_broker() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            kind, body = await read_packet(r)
            if kind == 0x82:
                w.write(b"\x90\x03" + body[:2] + b"\x80")

    async with RogueBroker(script) as rogue:
        s = BrokerSettings.from_url(rogue.url, client_id=cid("rf"))
        async with MqttLink(s) as link:
            with pytest.raises(SubscribeRefused, match="refused the subscription"):
                await link.subscribe("peerd/v1/t/in/someone-else", timeout=5)
            assert link.subscriptions == []


async def test_close_during_a_connection_attempt_returns_at_once() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await idle(r, w)

    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # never a CONNACK
    port = server.sockets[0].getsockname()[1]
    s = BrokerSettings.from_url(f"mqtt://127.0.0.1:{port}", client_id="slow", connect_timeout=3600)
    link = MqttLink(s)
    async with link:
        await asyncio.sleep(0.2)
        assert not link.connected
        # Waiting out the connect timeout would take an hour: only a prompt close passes.
        async with asyncio.timeout(30):
            await link.close()
    server.close()
    assert link.stats.connects == 0


async def test_connections_that_drop_right_after_connack_never_leave_the_link_up() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if n <= 5:
            return  # CONNACK, then hang up: during or right after the restore
        await idle(r, w)

    async with RogueBroker(script) as rogue:
        link: MqttLink
        consistent: list[bool] = []

        def on_state(up: bool) -> None:
            conn = link._conn
            consistent.append(up == (conn is not None and not conn.closed.done()))

        s = BrokerSettings.from_url(rogue.url, client_id=cid("ca"))
        link = MqttLink(s, on_state=on_state, backoff=Backoff(initial=0.001, maximum=0.002))
        async with link:
            await link.subscribe("peerd/v1/t/in/me", timeout=10)
            await eventually(lambda: rogue.connections >= 6 and link.connected, "sixth sticks")
            assert link._conn is not None
            assert not link._conn.closed.done()
        assert all(consistent)


async def test_cancelling_run_disconnects_cleanly_and_fails_what_waits() -> None:
    kinds: list[int] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            kind, body = await read_packet(r)
            kinds.append(kind)
            if kind == 0x82:
                w.write(bytes([0x90, 3]) + body[:2] + b"\x01")
            # QoS 1 publishes are never acknowledged: they stay outstanding

    async with RogueBroker(script) as rogue:
        s = BrokerSettings.from_url(rogue.url, client_id=cid("cc"))
        link = MqttLink(s)
        task = asyncio.create_task(link.run())  # as the daemon's TaskGroup runs it
        await link.wait_connected(5)
        sub = await link.subscribe("peerd/v1/t/in/me", timeout=5)
        waiting = asyncio.create_task(link.publish("peerd/v1/t/in/peer", b"x", qos=1))
        await eventually(lambda: link.unacked == 1, "the publish is in flight")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(LinkClosed):
            await waiting
        assert [m async for m in sub] == []
        assert not link.connected
        with pytest.raises(LinkClosed):
            link.publish_nowait("peerd/v1/t/in/peer", b"y")
        await eventually(lambda: kinds[-1:] == [0xE0], "a DISCONNECT reached the broker")


async def test_a_publish_is_resent_once_after_two_drops_in_a_row() -> None:
    """Dropped before its PUBACK, then again while subscriptions were being restored."""
    seen: dict[int, list[bytes]] = {}

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        seen[n] = []
        while True:
            kind, body = await read_packet(r)
            if kind == 0x82:
                if n == 2:
                    return  # hang up instead of a SUBACK
                w.write(bytes([0x90, 3]) + body[:2] + b"\x01")
            elif kind & 0xF0 == 0x30:
                seen[n].append(bytes([kind]) + body)
                if n == 1:
                    return  # hang up instead of a PUBACK
                w.write(b"\x40\x02" + body[2 + int.from_bytes(body[:2], "big") :][:2])

    async with RogueBroker(script) as rogue:
        s = BrokerSettings.from_url(rogue.url, client_id=cid("tw"))
        async with MqttLink(s, backoff=Backoff(initial=0.01, maximum=0.02)) as link:
            await link.subscribe("peerd/v1/t/in/me", timeout=5)
            async with asyncio.timeout(10):
                await link.publish("peerd/v1/t/in/peer", b"exactly once more", qos=1)
            assert link.stats.retransmitted == 1
    assert len(seen[1]) == 1
    assert seen[1][0][0] == 0x32  # QoS 1, no DUP
    assert seen[2] == []
    assert seen[3] == [bytes([0x3A]) + seen[1][0][1:]]  # the same packet with DUP, sent once


@settings(max_examples=60, deadline=None)
@given(stream=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=8))
def test_fuzzed_broker_bytes_never_break_the_link(stream: list[bytes]) -> None:
    """Whatever a hostile broker sends after CONNACK, the link drops it and recovers."""
    seen: list[Message] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            for piece in stream:
                w.write(piece)
                await w.drain()
            return  # and hang up
        await idle_until_subscribed(r, w)
        w.write(b"\x30\x08\x00\x04t/okok")
        await idle(r, w)

    async def main() -> None:
        async with RogueBroker(script) as rogue:
            s = BrokerSettings.from_url(rogue.url, client_id="fuzz")
            async with MqttLink(s, backoff=Backoff(initial=0.001, maximum=0.002)) as link:
                await link.subscribe("t/#", handler=seen.append, timeout=5)
                await eventually(lambda: any(m.topic == "t/ok" for m in seen), "recovered")
                assert link._task is not None
                assert not link._task.done()
        ok = [m for m in seen if m.topic == "t/ok"]
        assert ok[-1] == Message("t/ok", b"ok", 0, False, False)
        for m in seen:
            assert isinstance(m.payload, bytes)
            assert isinstance(m.topic, str)

    asyncio.run(main())


async def idle_until_subscribed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        kind, body = await read_packet(reader)
        if kind == 0x82:
            writer.write(b"\x90\x03" + body[:2] + b"\x01")
            return
